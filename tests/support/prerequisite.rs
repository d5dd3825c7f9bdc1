//! One rule for what a test needs from the machine: under CI a missing tool (or root, or
//! the control plane) fails the test; on a developer machine the test says loudly what
//! is missing and how to get it, and skips.

use std::path::PathBuf;

/// Whether this run is CI: `CI` set to anything but empty, `0` or `false`.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Reports a missing prerequisite: panics under CI, prints why the test skips otherwise.
/// Callers return right after.
pub fn missing(why: &str) {
    assert!(!ci(), "{why} (CI is set, so this is a failure, not a skip)");
    eprintln!("\n!!!!! SKIPPING: {why} !!!!!\n");
}

/// A tool installed by `scripts/install-test-tools.sh` into target/tools/bin.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = super::target_dir().join("tools/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    missing(&format!(
        "{} is missing; scripts/install-test-tools.sh installs it",
        path.display()
    ));
    None
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the test runs as root; reports it missing otherwise.
pub fn root(what: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    missing(&format!("{what} needs root"));
    false
}
