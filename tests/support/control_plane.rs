//! The real control plane (etcd, kube-apiserver, kube-controller-manager built by
//! `scripts/control-plane.sh build`): a private one per test, started by the script's
//! `serve` mode and stopped when the test drops it or dies, or the shared one that
//! `scripts/test-all.sh` started (`FLEETPATCH_TEST_CLUSTER`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Where `scripts/control-plane.sh build` puts the binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CONTROL_PLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::target_dir().join("control-plane/bin"))
}

/// Whether the control plane's binaries are built.
pub fn built() -> bool {
    ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .all(|b| bin_dir().join(b).exists())
}

/// A running control plane this test owns.
pub struct ControlPlane {
    child: Child,
    stdin: Option<ChildStdin>,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane with its state under `dir`; panics (with the end of the
    /// script's log) if it does not come up.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("control-plane.log");
        let mut child = Command::new(super::repo().join("scripts/control-plane.sh"))
            .arg("serve")
            .env("CONTROL_PLANE_DIR", dir)
            .env("CONTROL_PLANE_BIN", bin_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("scripts/control-plane.sh runs");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let kubeconfig = loop {
            match rx.recv_timeout(Duration::from_secs(180)) {
                Ok(line) => {
                    if let Some(path) = line.strip_prefix("ready ") {
                        break PathBuf::from(path);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "the control plane did not come up:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        Self {
            child,
            stdin,
            dir: dir.to_path_buf(),
            kubeconfig,
        }
    }

    /// The API server's log, for a failing test's message.
    pub fn apiserver_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/kube-apiserver.log")).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Kept for a look at what the controller did with its RBAC (see README).
        if let Some(keep) = std::env::var_os("FLEETPATCH_TEST_AUDIT_DIR") {
            let keep = Path::new(&keep);
            let _ = std::fs::create_dir_all(keep);
            let name = self
                .dir
                .parent()
                .and_then(Path::file_name)
                .unwrap_or_default();
            let _ = std::fs::copy(
                self.dir.join("logs/audit.log"),
                keep.join(format!("audit{}.log", name.to_string_lossy())),
            );
        }
        // Closing its standard input is the script's signal to stop what it started.
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control plane `scripts/test-all.sh` started for the whole run, if any: its
/// admin kubeconfig.
pub fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("FLEETPATCH_TEST_CLUSTER")?;
    let kubeconfig = Path::new(&dir).join("admin.kubeconfig");
    kubeconfig.exists().then_some(kubeconfig)
}
