//! `fleetpatch agent run --host-namespaces`: children of the node agent run in the
//! host's namespaces, not the agent container's. Here a stand-in "host" is a process in
//! its own mount and UTS namespaces (made with `unshare`, which needs root): a child
//! started through the agent's process runner must see that process's hostname and
//! mounts, and the agent itself must not.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetpatch::agent::process::{self, ProcessEnd, ProcessSpec};

struct Host(std::process::Child);

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn children_run_in_the_hosts_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("only-on-the-host");
    std::fs::create_dir(&mount_point).unwrap();
    let ready = dir.path().join("ready");
    let script = format!(
        "hostname fp-test-host && mount -t tmpfs none {m} && echo host-side > {m}/marker && touch {r} && exec sleep 120",
        m = mount_point.display(),
        r = ready.display()
    );
    let spawned = Command::new("unshare")
        .args(["--mount", "--uts", "--propagation", "private", "sh", "-c"])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(child) = spawned else {
        support::prerequisite::missing("unshare (util-linux) is not installed");
        return;
    };
    let mut host = Host(child);
    let started = Instant::now();
    while !ready.exists() {
        if let Ok(Some(status)) = host.0.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            host.0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            if !nix::unistd::geteuid().is_root() {
                support::prerequisite::missing(&format!(
                    "making namespaces needs root ({status}: {err})"
                ));
                return;
            }
            panic!("unshare failed as root ({status}): {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stand-in host did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent itself does not see the host's mount.
    assert!(!mount_point.join("marker").exists());

    process::use_host_namespaces(format!("/proc/{}/ns", host.0.id()).into()).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let outcome = process::run(&ProcessSpec {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            format!("hostname; cat {}/marker; pwd", mount_point.display()),
        ],
        current_dir: Some(work.clone()),
        timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        outcome.end,
        ProcessEnd::Exited(0),
        "{}",
        outcome.output_tail
    );
    let lines: Vec<&str> = outcome.output_tail.lines().collect();
    assert_eq!(
        lines,
        ["fp-test-host", "host-side", work.to_str().unwrap()],
        "the child ran outside the host's namespaces"
    );
}

#[test]
fn a_missing_namespace_directory_is_a_clear_error() {
    let err = process::use_host_namespaces("/nonexistent/ns".into()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ns/net"), "{err}");
}
