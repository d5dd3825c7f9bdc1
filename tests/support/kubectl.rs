//! kubectl (and any other client) run against a test cluster with its own kubeconfig,
//! HOME and cache, so nothing on the machine is touched.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The kubectl to drive: `KUBECTL` or the one on PATH.
pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Something kubectl can talk to: a kubeconfig and a private HOME.
pub trait Kubectl {
    fn kubeconfig(&self) -> &Path;
    fn home(&self) -> &Path;

    /// `program` with this cluster's kubeconfig and HOME, run from the repository.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.home())
            .env_remove("KUBECTL_EXTERNAL_DIFF")
            .current_dir(super::repo());
        command
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.command(&kubectl_bin())
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// Runs kubectl and returns its standard output; panics with its errors on failure.
    fn kubectl_ok(&self, args: &[&str]) -> String {
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
    fn kubectl_err(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            !output.status.success(),
            "kubectl {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
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

    /// `kubectl apply -f -` of `manifest`; panics with kubectl's errors on failure.
    fn apply(&self, manifest: &str) {
        let output = self.kubectl_stdin(&["apply", "-f", "-"], manifest);
        assert!(
            output.status.success(),
            "{}\n{manifest}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
