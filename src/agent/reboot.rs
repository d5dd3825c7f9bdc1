//! Rebooting the host, behind a trait so tests can stand in for a real reboot, and the
//! boot id that tells a resumed agent whether the host really came back from one.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    #[error("cannot start the reboot with {command}: {message}")]
    Command { command: String, message: String },
    #[error(
        "real reboots are forbidden here ({FORBID_REAL_REBOOT_ENV} is set, or this is a unit test)"
    )]
    Forbidden,
}

/// Set by the test harness (`.cargo/config.toml`, `scripts/test-all.sh`): no process
/// it starts may reboot the machine, whatever its flags say.
pub const FORBID_REAL_REBOOT_ENV: &str = "FLEETPATCH_FORBID_REAL_REBOOT";

/// Whether this process must never start a real reboot.
pub fn real_reboot_forbidden() -> bool {
    cfg!(test) || std::env::var_os(FORBID_REAL_REBOOT_ENV).is_some_and(|v| !v.is_empty())
}

/// What the job needs from the host's reboot machinery.
pub trait Rebooter: Send + Sync {
    /// Identity of the current boot; changes with every reboot.
    fn boot_id(&self) -> Option<String>;
    /// Starts the reboot. On success the agent stops working and waits to be killed.
    fn reboot(&self) -> Result<(), RebootError>;
}

/// The real host: `systemctl reboot` (or `shutdown -r now`) on Linux, `shutdown /r` on Windows.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostRebooter;

impl Rebooter for HostRebooter {
    fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|id| id.trim().to_string())
    }

    fn reboot(&self) -> Result<(), RebootError> {
        if real_reboot_forbidden() {
            return Err(RebootError::Forbidden);
        }
        let attempts: &[(&str, &[&str])] = if cfg!(windows) {
            &[(
                "shutdown",
                &["/r", "/t", "5", "/c", "fleetpatch: reboot after patching"],
            )]
        } else {
            &[("systemctl", &["reboot"]), ("shutdown", &["-r", "now"])]
        };
        let mut last = String::new();
        for (program, args) in attempts {
            let mut command = std::process::Command::new(program);
            command.args(*args);
            if let Err(err) = super::process::enter_host_namespaces(&mut command, None) {
                last = format!("{program}: {err}");
                continue;
            }
            match command.status() {
                Ok(status) if status.success() => return Ok(()),
                Ok(status) => last = format!("{program} exited with {status}"),
                Err(err) => last = format!("{program}: {err}"),
            }
        }
        Err(RebootError::Command {
            command: attempts
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(" / "),
            message: last,
        })
    }
}

/// Stands in for a reboot in tests and demos: the "boot id" is a counter in a file
/// that each simulated reboot increments; the agent process then stops as if the host
/// went down.
#[derive(Clone, Debug)]
pub struct SimulatedRebooter {
    pub counter_file: PathBuf,
}

impl Rebooter for SimulatedRebooter {
    fn boot_id(&self) -> Option<String> {
        Some(
            std::fs::read_to_string(&self.counter_file)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "0".into()),
        )
    }

    fn reboot(&self) -> Result<(), RebootError> {
        let next = self
            .boot_id()
            .and_then(|id| id.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        std::fs::write(&self.counter_file, next.to_string()).map_err(|err| RebootError::Command {
            command: "simulated reboot".into(),
            message: err.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_tests_never_reboot_the_machine() {
        assert!(matches!(HostRebooter.reboot(), Err(RebootError::Forbidden)));
    }
}
