//! What the integration tests share: the clusters they run against (the real control
//! plane or `fleetpatch dev`), kubectl and helm driven like a person would, child
//! processes that die with the test, and one rule for missing prerequisites.

#![allow(dead_code)]

pub mod cluster;
pub mod control_plane;
pub mod dev;
pub mod e2e;
pub mod fleet;
pub mod kubectl;
pub mod prerequisite;
#[cfg(feature = "full")]
pub mod raw;

use std::path::PathBuf;
use std::time::Duration;

#[allow(unused_imports)]
pub use cluster::Cluster;
#[allow(unused_imports)]
pub use dev::DevServer;
#[allow(unused_imports)]
pub use kubectl::Kubectl;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory (`CARGO_TARGET_DIR` when set).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
