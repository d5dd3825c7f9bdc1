//! What the end-to-end tests with real processes share: child processes that die with
//! the test, the controller started and waited for, plans run, agents awaited, and
//! raw HTTP requests with curl.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Kubectl, eventually};

pub const BIN: &str = env!("CARGO_BIN_EXE_fleetpatch");

/// A child process killed when the test ends.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Kills it the hard way, as a crash or a power cut would.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.0.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut code = None;
        eventually(timeout, || match self.0.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        code
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where a test's child processes log: nowhere, or the terminal with `E2E_DEBUG` set.
pub fn child_log() -> Stdio {
    if std::env::var_os("E2E_DEBUG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// The log level of a test's child processes: `RUST_LOG` when set, else warnings.
pub fn child_log_level() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Starts `fleetpatch controller` with `args` and `kubeconfig` and waits for the line of
/// its standard output that contains `wanted`; returns the process and the line.
pub fn start_controller(kubeconfig: &Path, args: &[&str], wanted: &str) -> (Process, String) {
    start_controller_logging(kubeconfig, args, wanted, None)
}

/// Like [`start_controller`], with its log (at `info`) written to `log` when given.
pub fn start_controller_logging(
    kubeconfig: &Path,
    args: &[&str],
    wanted: &str,
    log: Option<&Path>,
) -> (Process, String) {
    let mut command = Command::new(BIN);
    command
        .arg("controller")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::piped());
    match log {
        Some(log) => command
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap()),
        None => command
            .env("RUST_LOG", child_log_level())
            .stderr(child_log()),
    };
    let mut process = Process(command.spawn().unwrap());
    let stdout = process.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the controller did not print {wanted:?}"));
        if line.contains(wanted) {
            return (process, line);
        }
    }
}

/// `fleetpatch run plan NAME`, as a person would.
pub fn run_plan(kubeconfig: &Path, name: &str) {
    run_plan_in(kubeconfig, "default", name);
}

/// `fleetpatch run plan NAME -n NAMESPACE`.
pub fn run_plan_in(kubeconfig: &Path, namespace: &str, name: &str) {
    let output = Command::new(BIN)
        .args(["run", "plan", name, "-n", namespace])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until `count` Agents are Ready.
pub fn wait_for_ready_agents(cluster: &impl Kubectl, count: usize) {
    let ok = eventually(Duration::from_secs(30), || {
        cluster
            .kubectl_ok(&[
                "get",
                "agents",
                "-o",
                "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .split_whitespace()
            .filter(|s| *s == "True")
            .count()
            == count
    });
    assert!(
        ok,
        "agents did not become Ready:\n{}",
        cluster.kubectl_ok(&["get", "agents", "-o", "yaml"])
    );
}

/// curl's error (if any), the body and, on the last line, the HTTP status (000 when
/// no answer came).
pub fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    )
}
