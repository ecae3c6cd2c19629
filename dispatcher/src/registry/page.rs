//! Pages of a list: the opaque cursor a client is handed as `next`, the page it asks for
//! (`limit`, `cursor`), the keyset SQL that starts a page after a cursor, and how many rows fit
//! a page's byte budget. Every list the API serves (devices, proposals, and later the call log)
//! pages this way.
//!
//! Pure: no query runs here; the lists build theirs from [`Order`]. A cursor names the last row
//! of a page by its sort key (a time in unix milliseconds, then its id); the next page starts
//! strictly after that key, so a walk sees every row that exists throughout it exactly once, in
//! a stable order, even when rows share a time and while rows are added or deleted.
//!
//! The cursor is opaque to clients but not secret: it only positions a query that is already
//! scoped to the caller, so a forged one can show nothing it should not.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use protocol::subject::is_uuid;

/// `limit` when a client gives none.
pub const DEFAULT_PAGE_LIMIT: usize = protocol::PAGE_LIMIT_DEFAULT;
/// Largest `limit` a client may ask for.
pub const MAX_PAGE_LIMIT: usize = protocol::PAGE_LIMIT_MAX;

/// Where a page ends: the sort key of its last row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The row's time, unix milliseconds (a list's first sort key).
    pub at_ms: i64,
    /// The row's id (the tie-breaker): a UUID.
    pub id: String,
}

impl Cursor {
    /// The cursor as a client sees it: base64url (no padding) of `<ms>.<id>`.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}.{}", self.at_ms, self.id))
    }

    /// A cursor from [`Cursor::encode`]'s form; anything else is [`PageError::Cursor`].
    pub fn decode(text: &str) -> Result<Self, PageError> {
        // A UUID, a dot and 20 digits at most: anything longer is not ours.
        if text.len() > 96 {
            return Err(PageError::Cursor);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| PageError::Cursor)?;
        let text = String::from_utf8(bytes).map_err(|_| PageError::Cursor)?;
        let (at, id) = text.split_once('.').ok_or(PageError::Cursor)?;
        let at_ms = at.parse::<i64>().map_err(|_| PageError::Cursor)?;
        if !is_uuid(id) || !at.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            return Err(PageError::Cursor);
        }
        Ok(Self { at_ms, id: id.to_owned() })
    }
}

/// Every row of a paged list, fetching page after page from the first: unbounded, for the
/// server's own use (a snapshot), never a client's response.
pub(crate) async fn every_page<T, E, F, Fut>(mut fetch: F) -> Result<Vec<T>, E>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<Page<T>, E>>,
{
    let mut all = Vec::new();
    let mut request = PageRequest { limit: MAX_PAGE_LIMIT, after: None };
    loop {
        let page = fetch(request.clone()).await?;
        all.extend(page.items);
        match page.next {
            Some(next) => request.after = Some(next),
            None => return Ok(all),
        }
    }
}

/// Of `candidates` (id, time, stored bytes) fetched in list order, at most `limit + 1` of them:
/// how many make the page (at most `limit`, within `max_bytes`, one always), and the cursor of
/// the next page when rows are left.
pub(crate) fn choose_rows(candidates: &[(String, i64, i64)], limit: usize, max_bytes: u64) -> (usize, Option<Cursor>) {
    let sizes: Vec<u64> =
        candidates.iter().take(limit.max(1)).map(|(_, _, size)| u64::try_from(*size).unwrap_or(0)).collect();
    let count = rows_within(&sizes, max_bytes);
    let next = (candidates.len() > count)
        .then(|| candidates[..count].last().map(|(id, at_ms, _)| Cursor { at_ms: *at_ms, id: id.clone() }))
        .flatten();
    (count, next)
}

/// A page as a client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Most rows on the page (1 to [`MAX_PAGE_LIMIT`]).
    pub limit: usize,
    /// Start after this row; the first page when `None`.
    pub after: Option<Cursor>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { limit: DEFAULT_PAGE_LIMIT, after: None }
    }
}

impl PageRequest {
    /// The page named by a request's `limit` and `cursor` parameters. Absent or empty means
    /// the default (the first page of [`DEFAULT_PAGE_LIMIT`] rows).
    pub fn parse(limit: Option<&str>, cursor: Option<&str>) -> Result<Self, PageError> {
        let limit = match limit.filter(|text| !text.is_empty()) {
            None => DEFAULT_PAGE_LIMIT,
            Some(text) => match text.parse::<usize>() {
                Ok(limit) if (1..=MAX_PAGE_LIMIT).contains(&limit) && text.bytes().all(|b| b.is_ascii_digit()) => limit,
                _ => return Err(PageError::Limit),
            },
        };
        let after = cursor.filter(|text| !text.is_empty()).map(Cursor::decode).transpose()?;
        Ok(Self { limit, after })
    }
}

/// What is wrong with a page request (a 400 for the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("limit: a whole number from 1 to {MAX_PAGE_LIMIT}")]
    Limit,
    #[error("cursor: not one this server handed out (pass the previous page's `next` as it is)")]
    Cursor,
}

/// Rows of one page, and where the next one starts when there are more.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// The order of a list: by time, then id, the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

impl Order {
    /// `ORDER BY` for the list's time and id columns.
    pub fn order_by(self, time: &str, id: &str) -> String {
        match self {
            Self::OldestFirst => format!("ORDER BY {time}, {id}"),
            Self::NewestFirst => format!("ORDER BY {time} DESC, {id} DESC"),
        }
    }

    /// The condition that keeps the rows strictly after a cursor whose time is bound as
    /// `$time_param` and whose id as `$time_param + 1`. Written without row-value comparison,
    /// which not every engine plans with an index.
    pub fn after(self, time: &str, id: &str, time_param: usize) -> String {
        let (t, i) = (time_param, time_param + 1);
        let cmp = match self {
            Self::OldestFirst => '>',
            Self::NewestFirst => '<',
        };
        format!("({time} {cmp} ${t} OR ({time} = ${t} AND {id} {cmp} ${i}))")
    }
}

/// How many of a page's candidate rows (their sizes in bytes, in page order) go on a page of
/// at most `budget` bytes: as many as fit, and at least one, so a row larger than the budget
/// is served alone rather than never.
pub fn rows_within(sizes: &[u64], budget: u64) -> usize {
    let mut total = 0u64;
    for (index, size) in sizes.iter().enumerate() {
        match total.checked_add(*size) {
            Some(sum) if sum <= budget => total = sum,
            _ => return index.max(1),
        }
    }
    sizes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7a04dbde-1c2f-4e4b-9a51-0d5b8f1e2a3c";

    #[test]
    fn cursors_round_trip() {
        for at_ms in [0, 1, 1_767_225_600_000, -5, i64::MAX, i64::MIN] {
            let cursor = Cursor { at_ms, id: ID.into() };
            let text = cursor.encode();
            assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{text}");
            assert_eq!(Cursor::decode(&text), Ok(cursor));
        }
    }

    #[test]
    fn odd_cursors_are_refused() {
        let encode = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let long = "A".repeat(10_000);
        let table = [
            "".to_owned(),
            "nonsense!".to_owned(),
            long,
            encode("12"),
            encode(&format!("x.{ID}")),
            encode(&format!("+12.{ID}")),
            encode("12.not-a-uuid"),
            encode(&format!("12.{ID}.3")),
            encode(&format!("99999999999999999999.{ID}")),
            URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x2e]),
        ];
        for text in table {
            assert_eq!(Cursor::decode(&text), Err(PageError::Cursor), "{text:.40}");
        }
    }

    #[test]
    fn page_requests() {
        let cursor = Cursor { at_ms: 42, id: ID.into() };
        let encoded = cursor.encode();
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<PageRequest, PageError>);
        let table: [Case; 13] = [
            (None, None, Ok(PageRequest::default())),
            (Some(""), Some(""), Ok(PageRequest::default())),
            (Some("1"), None, Ok(PageRequest { limit: 1, after: None })),
            (Some("500"), None, Ok(PageRequest { limit: 500, after: None })),
            (Some("7"), Some(&encoded), Ok(PageRequest { limit: 7, after: Some(cursor.clone()) })),
            (Some("0"), None, Err(PageError::Limit)),
            (Some("501"), None, Err(PageError::Limit)),
            (Some("-1"), None, Err(PageError::Limit)),
            (Some("+5"), None, Err(PageError::Limit)),
            (Some("ten"), None, Err(PageError::Limit)),
            (Some("1e3"), None, Err(PageError::Limit)),
            (Some("99999999999999999999999"), None, Err(PageError::Limit)),
            (None, Some("garbage"), Err(PageError::Cursor)),
        ];
        for (limit, cursor, want) in table {
            assert_eq!(PageRequest::parse(limit, cursor), want, "{limit:?} {cursor:?}");
        }
    }

    #[test]
    fn keyset_sql() {
        assert_eq!(Order::NewestFirst.order_by("created_at", "id"), "ORDER BY created_at DESC, id DESC");
        assert_eq!(Order::OldestFirst.order_by("created_at", "id"), "ORDER BY created_at, id");
        assert_eq!(
            Order::NewestFirst.after("created_at", "id", 3),
            "(created_at < $3 OR (created_at = $3 AND id < $4))"
        );
        assert_eq!(Order::OldestFirst.after("t", "k", 1), "(t > $1 OR (t = $1 AND k > $2))");
    }

    #[test]
    fn rows_fit_the_budget_and_at_least_one_goes() {
        let table: [(&[u64], u64, usize); 8] = [
            (&[], 10, 0),
            (&[3, 3, 3], 10, 3),
            (&[3, 3, 3, 3], 10, 3),
            (&[5, 5], 10, 2),
            (&[20, 1], 10, 1),
            (&[1, 20], 10, 1),
            (&[0, 0, 0], 0, 3),
            (&[u64::MAX, u64::MAX], u64::MAX, 1),
        ];
        for (sizes, budget, want) in table {
            assert_eq!(rows_within(sizes, budget), want, "{sizes:?} within {budget}");
        }
    }
}
