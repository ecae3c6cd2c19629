//! Naming a device on the command line: by its id, or by a name no other of the user's devices
//! shares. [`resolve_device`] picks the id from the user's device list; pure.
//!
//! Not here: whether the device exists or belongs to the caller. A name that matches nothing is
//! passed to the server as it is, and the server's 404 is the answer (exit 5), exactly as for an
//! unknown id.

use protocol::Device;

use super::exit::CliError;

/// True when `argument` is shaped like a device id (a UUID): it is used as one without
/// fetching the device list.
pub fn is_device_id(argument: &str) -> bool {
    protocol::subject::is_uuid(argument)
}

/// The id to put in the request path for `argument`: the id of the device with that id or that
/// name, or `argument` itself when none matches (the server then answers 404). Several devices
/// with that name are a usage error that lists their ids.
pub fn resolve_device(argument: &str, devices: &[Device]) -> Result<String, CliError> {
    if devices.iter().any(|device| device.id == argument) {
        return Ok(argument.to_owned());
    }
    let named: Vec<&Device> = devices.iter().filter(|device| device.name == argument).collect();
    match named.as_slice() {
        [] => Ok(argument.to_owned()),
        [device] => Ok(device.id.clone()),
        several => {
            let candidates: Vec<String> = several
                .iter()
                .map(|device| {
                    let state = if device.online { "online" } else { "offline" };
                    format!("  {} ({state})", device.id)
                })
                .collect();
            Err(CliError::Usage(format!(
                "{} devices are named {:?}; name one by its id:\n{}",
                several.len(),
                argument,
                candidates.join("\n")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    const A: &str = "11111111-1111-4111-8111-111111111111";
    const B: &str = "22222222-2222-4222-8222-222222222222";
    const C: &str = "33333333-3333-4333-8333-333333333333";

    fn device(id: &str, name: &str, online: bool) -> Device {
        Device {
            id: id.into(),
            name: name.into(),
            platform: None,
            online,
            replica: None,
            created_at: Utc::now(),
            last_seen_at: None,
            tools: None,
            roots: None,
            tool_count: None,
        }
    }

    #[test]
    fn names_and_ids_resolve() {
        let devices =
            [device(A, "laptop", true), device(B, "twin", true), device(C, "twin", false), device(B, A, false)];
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("laptop", Ok(A)),
            // An id wins over a device named like it.
            (A, Ok(A)),
            (B, Ok(B)),
            (C, Ok(C)),
            ("twin", Err(())),
            // Unknown: passed on for the server to answer 404.
            ("desktop", Ok("desktop")),
            ("Laptop", Ok("Laptop")),
            ("", Ok("")),
        ];
        for (argument, want) in cases {
            let got = resolve_device(argument, &devices);
            match want {
                Ok(id) => assert_eq!(got.as_deref(), Ok(*id), "{argument:?}"),
                Err(()) => assert!(matches!(got, Err(CliError::Usage(_))), "{argument:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn an_ambiguous_name_lists_the_candidates() {
        let devices = [device(B, "twin", true), device(C, "twin", false), device(A, "laptop", true)];
        let error = resolve_device("twin", &devices).unwrap_err();
        assert_eq!(error.exit_code(), crate::cli::ExitCode::Usage);
        let text = error.to_string();
        assert!(text.starts_with("2 devices are named \"twin\""), "{text}");
        assert!(text.contains(&format!("{B} (online)")), "{text}");
        assert!(text.contains(&format!("{C} (offline)")), "{text}");
        assert!(!text.contains(A), "{text}");
    }

    #[test]
    fn ids_are_recognised_by_shape() {
        assert!(is_device_id(A));
        assert!(!is_device_id("laptop"));
        assert!(!is_device_id(&A[..30]));
    }
}
