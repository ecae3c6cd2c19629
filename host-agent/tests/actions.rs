//! `FUSION_HOST_OPENER` and `FUSION_HOST_REVEALER` point the actions at another program, which
//! gets the scoped absolute path as its only argument. Alone in its own test binary because it
//! sets process environment variables.
//!
//! Does not: test the actions' scope checks (`tools.rs`, `escape.rs`).

#![cfg(unix)]

mod tool_support;

use std::os::unix::fs::PermissionsExt;

use host_agent::tools::{Toolbox, ENV_OPENER, ENV_REVEALER};
use serde_json::json;
use tool_support::{call, shown};

#[test]
fn environment_overrides_name_the_programs_and_the_path_is_their_only_argument() {
    let base = tempfile::tempdir().expect("tempdir");
    let root = base.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("plan.pdf"), "pdf").expect("write");
    let mut programs = Vec::new();
    for name in ["opener", "revealer"] {
        let log = base.path().join(format!("{name}.log"));
        let script = base.path().join(format!("{name}.sh"));
        let body = format!(
            "#!/bin/sh\necho \"$#\" >> '{log}'\nfor a in \"$@\"; do echo \"$a\" >> '{log}'; done\n",
            log = log.display()
        );
        std::fs::write(&script, body).expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        programs.push((script, log));
    }
    std::env::set_var(ENV_OPENER, &programs[0].0);
    std::env::set_var(ENV_REVEALER, &programs[1].0);
    let toolbox = Toolbox::new(std::slice::from_ref(&root)).expect("toolbox");
    std::env::remove_var(ENV_OPENER);
    std::env::remove_var(ENV_REVEALER);

    let opened = toolbox.run(&call("open_path", json!({"path": "plan.pdf"})));
    assert!(opened.ok, "{:?}", opened.error);
    let revealed = toolbox.run(&call("reveal_in_os", json!({"path": "plan.pdf"})));
    assert!(revealed.ok, "{:?}", revealed.error);
    assert_eq!(revealed.result.expect("ok")["revealed"], shown(&root.join("plan.pdf")));

    let expected = format!("1\n{}\n", root.join("plan.pdf").display());
    assert_eq!(std::fs::read_to_string(&programs[0].1).expect("opener log"), expected);
    assert_eq!(std::fs::read_to_string(&programs[1].1).expect("revealer log"), expected);
}
