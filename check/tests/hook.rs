//! The binary's panic hook, in a child process: a panic that nobody catches is one line on
//! stderr and the exit status [`INTERNAL_ERROR`], never a trace or status 101; one inside
//! [`catch`] is an error value and stays quiet.
use std::process::Command;

use prime_check::panics::{catch, guard_main, install_hook, INTERNAL_ERROR};

/// Runs this test binary's `child` test in a child process with `PANIC_CASE=case`.
fn run_child(case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("PANIC_CASE", case)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn child() {
    let Ok(case) = std::env::var("PANIC_CASE") else {
        return;
    };
    install_hook();
    match case.as_str() {
        "caught" => {
            let message = catch::<()>(|| panic!("inside catch")).unwrap_err();
            eprintln!("caught: {message}");
            std::process::exit(0);
        }
        "guarded" => guard_main(|| panic!("in the guarded main")),
        "thread" => {
            let _ = std::thread::Builder::new()
                .name("compute".into())
                .spawn(|| panic!("on a thread, with a libtorch-like \\n trace"))
                .unwrap()
                .join();
            // The hook ends the process first.
            std::process::exit(0);
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn panics_are_one_line_with_the_internal_error_status() {
    let (code, stderr) = run_child("caught");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("caught: inside catch"), "{stderr}");
    assert!(!stderr.contains("internal error"), "{stderr}");

    let (code, stderr) = run_child("thread");
    assert_eq!(code, Some(INTERNAL_ERROR), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("internal error"))
        .unwrap_or_else(|| panic!("no internal error line in {stderr}"));
    assert!(
        line.starts_with("Error: internal error in thread compute: on a thread"),
        "{line}"
    );
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

#[test]
fn a_panic_in_the_guarded_main_is_one_line_too() {
    // The test harness runs the child on a thread named after the test: the hook reports it
    // itself, before the guard sees it; either way one line and INTERNAL_ERROR.
    let (code, stderr) = run_child("guarded");
    assert_eq!(code, Some(INTERNAL_ERROR), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("internal error"))
            .count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("in the guarded main"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}
