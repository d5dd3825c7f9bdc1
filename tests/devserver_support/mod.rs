//! Starts the real `fleetpatch dev` binary for end-to-end tests and drives kubectl
//! (and helm) against it with a private kubeconfig and cache.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct DevServer {
    child: Child,
    pub url: String,
    pub port: u16,
    pub home: PathBuf,
    pub kubeconfig: PathBuf,
    pub data_dir: Option<PathBuf>,
}

/// The kubectl to drive: `KUBECTL` or the one on PATH.
pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .env_remove("KUBECTL_EXTERNAL_DIFF")
            .current_dir(repo());
        command
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.command(&kubectl_bin())
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// Runs kubectl and returns its standard output; panics with its errors on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "kubectl {args:?} failed:\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Runs kubectl expecting failure; returns its standard error.
    pub fn kubectl_err(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            !output.status.success(),
            "kubectl {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(&kubectl_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
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

impl Drop for DevServer {
    fn drop(&mut self) {
        self.stop();
    }
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
