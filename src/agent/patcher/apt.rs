//! apt (Debian, Ubuntu): `apt-get update`, a simulated upgrade to find candidates and
//! their origin (a `-security` suite marks security fixes), `apt-get install
//! --only-upgrade`, then `dpkg-query` to see what is really installed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use futures::future::BoxFuture;
use regex::Regex;

use crate::api::patchjob::{ActionPhase, PatchResults};
use crate::api::plan::PatchSelection;

use super::{Commands, PatchError, Patcher, Update, results, run, select};

/// The apt patcher. `options` are extra `-o Key=Value` settings, e.g. to point apt at
/// another sources list.
#[derive(Clone, Debug)]
pub struct Apt {
    pub options: Vec<String>,
    /// File whose presence means a reboot is needed.
    pub reboot_marker: PathBuf,
    pub commands: Commands,
}

impl Default for Apt {
    fn default() -> Self {
        Self {
            options: Vec::new(),
            reboot_marker: PathBuf::from("/var/run/reboot-required"),
            commands: Commands::default(),
        }
    }
}

const NONINTERACTIVE: &[(&str, &str)] = &[
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("APT_LISTCHANGES_FRONTEND", "none"),
];

impl Apt {
    fn args<'a>(&'a self, tail: &[&'a str]) -> Vec<&'a str> {
        let mut args: Vec<&str> = Vec::new();
        for option in &self.options {
            args.push("-o");
            args.push(option);
        }
        args.extend_from_slice(tail);
        args
    }

    /// Arguments of the install step for `packages`.
    pub fn install_args(&self, packages: &[String]) -> Vec<String> {
        let mut args: Vec<String> = self
            .args(&[
                "-y",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                "install",
                "--only-upgrade",
            ])
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(packages.iter().cloned());
        args
    }
}

/// Parses `apt-get -s upgrade` output: one `Inst` line per package to upgrade.
pub fn parse_simulation(output: &str) -> Vec<Update> {
    static LINE: OnceLock<Regex> = OnceLock::new();
    let line = LINE.get_or_init(|| {
        Regex::new(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+) ([^\[\)]*?)(?: \[[^\]]*\])?\)")
            .expect("valid regex")
    });
    output
        .lines()
        .filter_map(|l| line.captures(l))
        .map(|c| {
            let origin = c.get(4).map_or("", |m| m.as_str());
            let security = origin
                .split([',', ' '])
                .any(|suite| suite.contains("-security") || suite.starts_with("Debian-Security"));
            Update {
                name: c[1].to_string(),
                current_version: c.get(2).map(|m| m.as_str().to_string()),
                new_version: c[3].to_string(),
                arch: None,
                security,
                critical: security,
            }
        })
        .collect()
}

/// Parses `dpkg-query -W -f='${Package} ${Version}\n'` output.
pub fn parse_installed(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, version)| !version.trim().is_empty())
        .map(|(name, version)| (name.to_string(), version.trim().to_string()))
        .collect()
}

impl Patcher for Apt {
    fn name(&self) -> &'static str {
        "apt"
    }

    fn apply<'a>(
        &'a self,
        selection: &'a PatchSelection,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PatchResults, PatchError>> {
        Box::pin(async move {
            run(
                &self.commands.spec(
                    "apt-get",
                    &self.args(&["-q", "update"]),
                    NONINTERACTIVE,
                    timeout,
                ),
                &[0],
            )
            .await?;
            let simulation = run(
                &self.commands.spec(
                    "apt-get",
                    &self.args(&["-s", "upgrade"]),
                    NONINTERACTIVE,
                    timeout,
                ),
                &[0],
            )
            .await?;
            let wanted = select(parse_simulation(&simulation.stdout), selection);
            if wanted.is_empty() {
                return Ok(results(
                    self.name(),
                    &[],
                    &Default::default(),
                    self.reboot_marker.exists(),
                ));
            }
            let names: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
            let install_args = self.install_args(&names);
            let install_args: Vec<&str> = install_args.iter().map(String::as_str).collect();
            let install = run(
                &self
                    .commands
                    .spec("apt-get", &install_args, NONINTERACTIVE, timeout),
                &[0, 100],
            )
            .await?;
            let mut query_args = vec!["-W", "-f=${Package} ${Version}\\n"];
            query_args.extend(names.iter().map(String::as_str));
            let installed = run(
                &self.commands.spec("dpkg-query", &query_args, &[], timeout),
                &[0, 1],
            )
            .await?;
            let mut results = results(
                self.name(),
                &wanted,
                &parse_installed(&installed.stdout),
                self.reboot_marker.exists(),
            );
            if results.phase == ActionPhase::Failed {
                results.message = format!("{}\n{}", results.message, install.output_tail);
            }
            Ok(results)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from `apt-get -s upgrade` on Debian 12.
    const SIMULATION: &str = "\
NOTE: This is only a simulation!
      apt-get needs root privileges for real execution.
Reading package lists...
Building dependency tree...
Reading state information...
Calculating upgrade...
The following packages will be upgraded:
  base-files libssl3 openssl
3 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.
Inst base-files [12.4+deb12u5] (12.4+deb12u6 Debian:12.6/stable [amd64])
Inst libssl3 [3.0.11-1~deb12u2] (3.0.13-1~deb12u1 Debian-Security:12/stable-security [amd64])
Inst openssl [3.0.11-1~deb12u2] (3.0.13-1~deb12u1 Debian-Security:12/stable-security, Debian:12.6/stable [amd64])
Inst fleetpatch-demo (2.0 local [all])
Conf base-files (12.4+deb12u6 Debian:12.6/stable [amd64])
";

    #[test]
    fn simulation_lists_candidates_and_marks_security_suites() {
        let updates = parse_simulation(SIMULATION);
        let summary: Vec<(&str, Option<&str>, &str, bool)> = updates
            .iter()
            .map(|u| {
                (
                    u.name.as_str(),
                    u.current_version.as_deref(),
                    u.new_version.as_str(),
                    u.security,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("base-files", Some("12.4+deb12u5"), "12.4+deb12u6", false),
                (
                    "libssl3",
                    Some("3.0.11-1~deb12u2"),
                    "3.0.13-1~deb12u1",
                    true
                ),
                (
                    "openssl",
                    Some("3.0.11-1~deb12u2"),
                    "3.0.13-1~deb12u1",
                    true
                ),
                ("fleetpatch-demo", None, "2.0", false),
            ]
        );
    }

    #[test]
    fn install_is_noninteractive_and_upgrade_only() {
        let apt = Apt {
            options: vec!["Dir::Etc::SourceList=/tmp/s.list".into()],
            ..Apt::default()
        };
        let args = apt.install_args(&["openssl".into()]);
        assert_eq!(
            args,
            [
                "-o",
                "Dir::Etc::SourceList=/tmp/s.list",
                "-y",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
                "install",
                "--only-upgrade",
                "openssl"
            ]
        );
    }

    #[test]
    fn installed_versions_are_read_from_dpkg_query() {
        let versions = parse_installed("openssl 3.0.13-1~deb12u1\nnot-installed \n");
        assert_eq!(versions.len(), 1);
        assert_eq!(versions["openssl"], "3.0.13-1~deb12u1");
    }
}
