//! Starts the real `fleetpatch dev` binary for tests; kubectl and helm drive it through
//! [`Kubectl`] with a private kubeconfig and cache.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::Kubectl;

pub struct DevServer {
    child: Child,
    pub url: String,
    pub port: u16,
    pub home: PathBuf,
    pub kubeconfig: PathBuf,
    pub data_dir: Option<PathBuf>,
}

impl DevServer {
    /// Starts a server on a free port with its files under `home`.
    pub fn start(home: &Path, data_dir: Option<&Path>) -> Self {
        Self::start_on(home, data_dir, 0)
    }

    pub fn start_on(home: &Path, data_dir: Option<&Path>, port: u16) -> Self {
        let kubeconfig = home.join("kubeconfig");
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleetpatch"));
        command
            .args(["dev", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--bookmark-interval-seconds", "1"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(dir) = data_dir {
            command.arg("--data-dir").arg(dir);
        }
        let mut child = command.spawn().expect("fleetpatch dev starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("fleetpatch dev prints its address");
            if let Some(url) = line.strip_prefix("fleetpatch dev: listening on ") {
                break url.to_string();
            }
        };
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child,
            url,
            port,
            home: home.to_path_buf(),
            kubeconfig,
            data_dir: data_dir.map(Path::to_path_buf),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the server process, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Stops the server (SIGKILL: persistence must not depend on a clean stop).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kubectl for DevServer {
    fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn home(&self) -> &Path {
        &self.home
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.stop();
    }
}
