//! dnf and yum (RHEL, Fedora, Rocky, Amazon Linux): `check-update` for candidates,
//! `updateinfo` for security and critical advisories, `upgrade` for the chosen
//! packages, `rpm -q` to see what is installed, `needs-restarting -r` for reboots.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::api::patchjob::PatchResults;
use crate::api::plan::{PatchClassification, PatchSelection};

use super::{Commands, PatchError, Patcher, Update, results, run, select};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Dnf,
    Yum,
}

#[derive(Clone, Debug)]
pub struct Dnf {
    pub flavour: Flavour,
    pub commands: Commands,
}

/// rpm query format matching the `[epoch:]version-release` that check-update prints.
pub const RPM_QUERY_FORMAT: &str = "%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n";

impl Dnf {
    pub fn new(flavour: Flavour) -> Self {
        Self {
            flavour,
            commands: Commands::default(),
        }
    }

    fn program(&self) -> &'static str {
        match self.flavour {
            Flavour::Dnf => "dnf",
            Flavour::Yum => "yum",
        }
    }

    /// Arguments that list security advisories with their packages.
    pub fn updateinfo_args(&self) -> Vec<&'static str> {
        match self.flavour {
            Flavour::Dnf => vec!["-q", "updateinfo", "list", "--security", "--available"],
            Flavour::Yum => vec!["-q", "updateinfo", "list", "security", "available"],
        }
    }

    /// Arguments that upgrade exactly `packages`.
    pub fn upgrade_args(&self, packages: &[String]) -> Vec<String> {
        let verb = match self.flavour {
            Flavour::Dnf => "upgrade",
            Flavour::Yum => "update",
        };
        let mut args = vec!["-y".to_string(), verb.to_string()];
        args.extend(packages.iter().cloned());
        args
    }
}

/// Strips `.arch` from `name.arch`.
fn strip_arch(name_arch: &str) -> &str {
    name_arch
        .rsplit_once('.')
        .map_or(name_arch, |(name, _)| name)
}

/// Parses `dnf check-update` / `yum check-update` output (exit code 100 when updates exist).
pub fn parse_check_update(output: &str) -> Vec<Update> {
    let mut tokens: Vec<&str> = Vec::new();
    for line in output.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("Obsoleting Packages") || trimmed.starts_with("Security:") {
            break;
        }
        if trimmed.is_empty() || trimmed.starts_with("Last metadata expiration") {
            continue;
        }
        // Long names wrap onto the next line; collect tokens and take them three at a time.
        tokens.extend(trimmed.split_whitespace());
    }
    tokens
        .chunks(3)
        .filter(|chunk| chunk.len() == 3 && chunk[0].contains('.'))
        .map(|chunk| Update {
            name: strip_arch(chunk[0]).to_string(),
            current_version: None,
            new_version: chunk[1].to_string(),
            arch: None,
            security: false,
            critical: false,
        })
        .collect()
}

/// Package name of an `name-[epoch:]version-release.arch` NEVRA.
pub fn nevra_name(nevra: &str) -> &str {
    let without_arch = strip_arch(nevra);
    let mut parts = without_arch.rsplitn(3, '-');
    let (_release, _version) = (parts.next(), parts.next());
    parts.next().unwrap_or(without_arch)
}

/// Parses `updateinfo list --security` into (package, critical) pairs.
pub fn parse_updateinfo(output: &str) -> BTreeMap<String, bool> {
    let mut packages = BTreeMap::new();
    for line in output.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        let severity = fields[1];
        if !(severity.contains("Sec") || severity.eq_ignore_ascii_case("security")) {
            continue;
        }
        let critical = severity.starts_with("Critical");
        let entry = packages
            .entry(nevra_name(fields[fields.len() - 1]).to_string())
            .or_insert(false);
        *entry |= critical;
    }
    packages
}

/// Parses `rpm -q --qf RPM_QUERY_FORMAT` output.
pub fn parse_rpm_query(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter(|l| !l.contains("is not installed"))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, version)| (name.to_string(), version.trim().to_string()))
        .collect()
}

impl Patcher for Dnf {
    fn name(&self) -> &'static str {
        self.program()
    }

    fn apply<'a>(
        &'a self,
        selection: &'a PatchSelection,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PatchResults, PatchError>> {
        Box::pin(async move {
            let program = self.program();
            let listed = run(
                &self
                    .commands
                    .spec(program, &["-q", "check-update"], &[], timeout),
                &[0, 100],
            )
            .await?;
            let mut candidates = parse_check_update(&listed.stdout);
            let wants_classes = selection.classifications.iter().any(|c| {
                matches!(
                    c,
                    PatchClassification::Security | PatchClassification::Critical
                )
            });
            if wants_classes {
                let info = run(
                    &self
                        .commands
                        .spec(program, &self.updateinfo_args(), &[], timeout),
                    &[0],
                )
                .await?;
                let advisories = parse_updateinfo(&info.stdout);
                for update in &mut candidates {
                    if let Some(critical) = advisories.get(&update.name) {
                        update.security = true;
                        update.critical = *critical;
                    }
                }
            }
            let wanted = select(candidates, selection);
            let reboot_required = needs_restarting(&self.commands, self.flavour, timeout).await;
            if wanted.is_empty() {
                return Ok(results(program, &[], &Default::default(), reboot_required));
            }
            let names: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
            let upgrade = self.upgrade_args(&names);
            let upgrade: Vec<&str> = upgrade.iter().map(String::as_str).collect();
            run(&self.commands.spec(program, &upgrade, &[], timeout), &[0]).await?;
            let mut query = vec!["-q", "--qf", RPM_QUERY_FORMAT];
            query.extend(names.iter().map(String::as_str));
            let installed = run(&self.commands.spec("rpm", &query, &[], timeout), &[0, 1]).await?;
            let reboot_required = needs_restarting(&self.commands, self.flavour, timeout).await;
            Ok(results(
                program,
                &wanted,
                &parse_rpm_query(&installed.stdout),
                reboot_required,
            ))
        })
    }
}

/// `needs-restarting -r` exits 1 when a reboot is needed; without the tool, assume not.
async fn needs_restarting(commands: &Commands, flavour: Flavour, timeout: Duration) -> bool {
    let spec = match flavour {
        Flavour::Dnf => commands.spec("dnf", &["-q", "needs-restarting", "-r"], &[], timeout),
        Flavour::Yum => commands.spec("needs-restarting", &["-r"], &[], timeout),
    };
    matches!(run(&spec, &[0, 1]).await, Ok(outcome) if outcome.end == crate::agent::process::ProcessEnd::Exited(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from `dnf -q check-update` on Rocky Linux 9.
    const CHECK_UPDATE: &str = "
NetworkManager.x86_64                     1:1.46.0-8.el9_4                       baseos
kernel.x86_64                             5.14.0-427.22.1.el9_4                  baseos
openssl-libs.x86_64                       1:3.0.7-27.el9_4                       baseos
python3-setuptools-wheel.noarch
                                          53.0.0-12.el9_4.1                      baseos
Obsoleting Packages
grub2-tools.x86_64                        1:2.06-80.el9                          baseos
";

    // Recorded from `dnf -q updateinfo list --security --available`.
    const UPDATEINFO: &str = "\
RLSA-2024:3339 Important/Sec. kernel-5.14.0-427.22.1.el9_4.x86_64
RLSA-2024:3501 Critical/Sec.  openssl-libs-1:3.0.7-27.el9_4.x86_64
RLBA-2024:3400 bugfix         NetworkManager-1:1.46.0-8.el9_4.x86_64
";

    #[test]
    fn check_update_output_including_wrapped_lines() {
        let updates = parse_check_update(CHECK_UPDATE);
        let names: Vec<(&str, &str)> = updates
            .iter()
            .map(|u| (u.name.as_str(), u.new_version.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("NetworkManager", "1:1.46.0-8.el9_4"),
                ("kernel", "5.14.0-427.22.1.el9_4"),
                ("openssl-libs", "1:3.0.7-27.el9_4"),
                ("python3-setuptools-wheel", "53.0.0-12.el9_4.1"),
            ]
        );
    }

    #[test]
    fn security_advisories_mark_packages_and_critical_severity() {
        let advisories = parse_updateinfo(UPDATEINFO);
        assert_eq!(advisories.get("kernel"), Some(&false));
        assert_eq!(advisories.get("openssl-libs"), Some(&true));
        assert!(
            !advisories.contains_key("NetworkManager"),
            "bug fixes are not security advisories"
        );
        assert_eq!(
            nevra_name("python3-setuptools-wheel-53.0.0-12.el9_4.1.noarch"),
            "python3-setuptools-wheel"
        );
    }

    #[test]
    fn commands_for_each_flavour() {
        assert_eq!(
            Dnf::new(Flavour::Dnf).upgrade_args(&["kernel".into()]),
            ["-y", "upgrade", "kernel"]
        );
        assert_eq!(
            Dnf::new(Flavour::Yum).upgrade_args(&["kernel".into()]),
            ["-y", "update", "kernel"]
        );
        assert_eq!(
            Dnf::new(Flavour::Yum).updateinfo_args(),
            ["-q", "updateinfo", "list", "security", "available"]
        );
    }

    #[test]
    fn rpm_query_output() {
        let versions = parse_rpm_query(
            "kernel 5.14.0-427.22.1.el9_4\nopenssl-libs 1:3.0.7-27.el9_4\npackage foo is not installed\n",
        );
        assert_eq!(versions["openssl-libs"], "1:3.0.7-27.el9_4");
        assert_eq!(versions.len(), 2);
    }
}
