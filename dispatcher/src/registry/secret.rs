//! The registry's secrets as values: minting bearer tokens and pairing codes, normalizing what a
//! person typed, hashing for storage, comparing hashes in constant time.
//!
//! Pure functions, no I/O: what gets stored where is `mod.rs` and its siblings' business. A
//! secret leaves this module in clear only to be handed to its holder once; the database sees
//! its SHA-256 (hex) and nothing else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Api tokens (held by the app's backend) start with this.
pub const API_TOKEN_PREFIX: &str = "pat_";
/// Device tokens (held by a host agent) start with this.
pub const DEVICE_TOKEN_PREFIX: &str = "dev_";
/// How many leading characters of a token are stored in clear, to name it for revocation.
pub const STORED_PREFIX_CHARS: usize = 12;
/// Bytes of randomness in a token: 256 bits.
const TOKEN_BYTES: usize = 32;
/// Length of a token's base64url (no padding) body.
const TOKEN_BODY_CHARS: usize = 43;

/// Crockford's base32 alphabet: no I, L, O or U, so a code read aloud or typed is unambiguous.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Symbols in a pairing code: 12 × 5 bits = 60 bits.
pub const PAIRING_CODE_SYMBOLS: usize = 12;
/// Symbols between hyphens in a pairing code as shown.
const PAIRING_CODE_GROUP: usize = 4;
/// Anything longer than this is not a pairing code, however many separators it has.
const PAIRING_INPUT_MAX_CHARS: usize = 64;

/// A new bearer token: `kind` (`pat_` or `dev_`) then 256 random bits in base64url, no padding.
pub fn new_token(kind: &str) -> String {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    format!("{kind}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// True when `token` has the shape of a token of `kind`, so odd input (empty, huge, another
/// kind) is turned away before it costs a hash or a query.
pub fn is_token_shaped(token: &str, kind: &str) -> bool {
    token.len() == kind.len() + TOKEN_BODY_CHARS
        && token.starts_with(kind)
        && token.bytes().skip(kind.len()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The part of a token stored in clear: its first [`STORED_PREFIX_CHARS`] characters.
pub fn stored_prefix(token: &str) -> String {
    token.chars().take(STORED_PREFIX_CHARS).collect()
}

/// SHA-256 of a secret, lowercase hex: the only form in which a secret is stored or looked up.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time equality of two stored hashes.
pub fn hashes_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A new pairing code as shown to a person: `XXXX-XXXX-XXXX` in Crockford base32 (60 bits).
pub fn new_pairing_code() -> String {
    let bits: u64 = rand::random();
    let mut code = String::with_capacity(PAIRING_CODE_SYMBOLS + PAIRING_CODE_SYMBOLS / PAIRING_CODE_GROUP);
    for i in 0..PAIRING_CODE_SYMBOLS {
        if i > 0 && i % PAIRING_CODE_GROUP == 0 {
            code.push('-');
        }
        // Twelve 5-bit symbols from the low 60 bits.
        let index = ((bits >> (5 * i)) & 0x1f) as usize;
        code.push(char::from(CROCKFORD[index]));
    }
    code
}

/// The canonical form of a typed pairing code, or `None` when it cannot be one: case folded,
/// hyphens and whitespace removed, O read as 0 and I or L as 1, exactly 12 symbols.
pub fn normalize_pairing_code(input: &str) -> Option<String> {
    if input.chars().count() > PAIRING_INPUT_MAX_CHARS {
        return None;
    }
    let mut code = String::with_capacity(PAIRING_CODE_SYMBOLS);
    for c in input.chars() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        let symbol = match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        };
        if !symbol.is_ascii() || !CROCKFORD.contains(&(symbol as u8)) {
            return None;
        }
        code.push(symbol);
    }
    (code.len() == PAIRING_CODE_SYMBOLS).then_some(code)
}

/// The alphabet of user codes (RFC 8628 section 6.1): twenty consonants, no vowels (no words
/// spelled by accident) and no digits (nothing to mistake for O, I or L).
const USER_CODE_ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Symbols in a user code: 20^8, about 34.5 bits; rate limits and a 10-minute life bound guessing.
pub const USER_CODE_SYMBOLS: usize = 8;
/// Anything longer than this is not a user code, however many separators it has.
const USER_CODE_INPUT_MAX_CHARS: usize = 32;

/// A new user code as shown to a person: `XXXX-XXXX`.
pub fn new_user_code() -> String {
    let mut code = String::with_capacity(USER_CODE_SYMBOLS + 1);
    for i in 0..USER_CODE_SYMBOLS {
        if i == USER_CODE_SYMBOLS / 2 {
            code.push('-');
        }
        code.push(char::from(USER_CODE_ALPHABET[rand::random_range(0..USER_CODE_ALPHABET.len())]));
    }
    code
}

/// The canonical form of a typed user code (8 symbols, upper case, no dash), or `None` when it
/// cannot be one: case folded, hyphens and whitespace removed.
pub fn normalize_user_code(input: &str) -> Option<String> {
    if input.chars().count() > USER_CODE_INPUT_MAX_CHARS {
        return None;
    }
    let mut code = String::with_capacity(USER_CODE_SYMBOLS);
    for c in input.chars() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        let symbol = c.to_ascii_uppercase();
        if !symbol.is_ascii() || !USER_CODE_ALPHABET.contains(&(symbol as u8)) {
            return None;
        }
        code.push(symbol);
    }
    (code.len() == USER_CODE_SYMBOLS).then_some(code)
}

/// A normalized user code as shown: `XXXX-XXXX`.
pub fn display_user_code(normalized: &str) -> String {
    let (head, tail) = normalized.split_at(normalized.len().min(USER_CODE_SYMBOLS / 2));
    format!("{head}-{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_their_kind_and_256_bits() {
        let token = new_token(API_TOKEN_PREFIX);
        assert!(token.starts_with("pat_"));
        assert!(is_token_shaped(&token, API_TOKEN_PREFIX));
        assert!(!is_token_shaped(&token, DEVICE_TOKEN_PREFIX));
        let body = URL_SAFE_NO_PAD.decode(&token[4..]).expect("base64url body");
        assert_eq!(body.len(), 32);
        assert_ne!(token, new_token(API_TOKEN_PREFIX));
        assert_eq!(stored_prefix(&token), token[..12]);
    }

    #[test]
    fn odd_tokens_are_not_token_shaped() {
        let long = "pat_".to_string() + &"a".repeat(10_000);
        let non_ascii = "pat_".to_string() + &"é".repeat(21) + "a";
        for odd in ["", "pat_", "dev_abc", long.as_str(), non_ascii.as_str()] {
            assert!(!is_token_shaped(odd, API_TOKEN_PREFIX), "{odd:?}");
        }
        assert_eq!(stored_prefix("é"), "é");
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(hash_secret("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(hashes_match(&hash_secret("x"), &hash_secret("x")));
        assert!(!hashes_match(&hash_secret("x"), &hash_secret("y")));
        assert!(!hashes_match("ab", "abc"));
    }

    #[test]
    fn pairing_codes_are_three_groups_of_crockford() {
        for _ in 0..100 {
            let code = new_pairing_code();
            assert_eq!(code.len(), 14, "{code}");
            let groups: Vec<&str> = code.split('-').collect();
            assert_eq!(groups.len(), 3, "{code}");
            assert!(groups.iter().all(|g| g.len() == 4 && g.bytes().all(|b| CROCKFORD.contains(&b))), "{code}");
            assert_eq!(normalize_pairing_code(&code).as_deref(), Some(code.replace('-', "").as_str()));
        }
    }

    #[test]
    fn typed_codes_are_normalized() {
        let table = [
            ("ABCD-EFGH-JKMN", Some("ABCDEFGHJKMN")),
            ("abcdefghjkmn", Some("ABCDEFGHJKMN")),
            (" abcd efgh jkmn ", Some("ABCDEFGHJKMN")),
            ("oOiI-lL00-1111", Some("001111001111")),
            ("ABCD-EFGH-JKM", None),
            ("ABCD-EFGH-JKMNP", None),
            ("ABCD-EFGH-JKMU", None),
            ("ABCD_EFGH_JKMN", None),
            ("", None),
            ("ÄBCD-EFGH-JKMN", None),
        ];
        for (input, want) in table {
            assert_eq!(normalize_pairing_code(input).as_deref(), want, "{input:?}");
        }
        assert_eq!(normalize_pairing_code(&"-".repeat(100_000)), None);
    }
    #[test]
    fn user_codes_are_two_groups_of_consonants() {
        for _ in 0..100 {
            let code = new_user_code();
            assert_eq!(code.len(), 9, "{code}");
            assert_eq!(&code[4..5], "-", "{code}");
            assert!(code.bytes().filter(|b| *b != b'-').all(|b| USER_CODE_ALPHABET.contains(&b)), "{code}");
            let normalized = normalize_user_code(&code).expect("normalizes");
            assert_eq!(display_user_code(&normalized), code);
        }
    }

    #[test]
    fn typed_user_codes_are_normalized() {
        let table = [
            ("BCDF-GHJK", Some("BCDFGHJK")),
            ("bcdfghjk", Some("BCDFGHJK")),
            (" bcdf ghjk ", Some("BCDFGHJK")),
            ("bCdF-gHjK", Some("BCDFGHJK")),
            ("BCDF-GHJ", None),
            ("BCDF-GHJKL", None),
            ("ABCD-EFGH", None),
            ("BCDF-GHJ1", None),
            ("BCDF_GHJK", None),
            ("", None),
            ("ÇCDF-GHJK", None),
        ];
        for (input, want) in table {
            assert_eq!(normalize_user_code(input).as_deref(), want, "{input:?}");
        }
        assert_eq!(normalize_user_code(&"-".repeat(100_000)), None);
    }
}
