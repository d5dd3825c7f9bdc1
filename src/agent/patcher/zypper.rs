//! zypper (SUSE, openSUSE): `list-updates` for package candidates, `list-patches`
//! for security and critical patches, `update` of the chosen packages, and zypper's
//! exit code 102 (or `needs-rebooting`) for reboots.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::api::patchjob::{ActionPhase, PatchResults};
use crate::api::plan::{PatchClassification, PatchSelection};

use super::{Commands, PatchError, Patcher, Update, results, run, select, summary};

/// zypper's "reboot needed" exit code.
pub const EXIT_REBOOT_NEEDED: i32 = 102;
/// zypper's "restart zypper (it updated itself)" exit code.
pub const EXIT_RESTART_NEEDED: i32 = 103;

#[derive(Clone, Debug, Default)]
pub struct Zypper {
    pub commands: Commands,
}

fn table_rows(output: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut header_seen = false;
    for line in output.lines() {
        if line.starts_with("--") || line.contains("-+-") {
            header_seen = true;
            continue;
        }
        if !header_seen || !line.contains('|') {
            continue;
        }
        rows.push(
            line.split('|')
                .map(|cell| cell.trim().to_string())
                .collect(),
        );
    }
    rows
}

/// Parses `zypper -q list-updates`: `S | Repository | Name | Current Version | Available Version | Arch`.
pub fn parse_list_updates(output: &str) -> Vec<Update> {
    table_rows(output)
        .into_iter()
        .filter(|row| row.len() >= 6)
        .map(|row| Update {
            name: row[2].clone(),
            current_version: Some(row[3].clone()),
            new_version: row[4].clone(),
            arch: None,
            security: false,
            critical: false,
        })
        .collect()
}

/// Parses `zypper -q list-patches --category security --with-packages`-less output,
/// `Repository | Name | Category | Severity | Interactive | Status | Summary`, into
/// needed patch names with their criticality.
pub fn parse_list_patches(output: &str) -> BTreeMap<String, bool> {
    table_rows(output)
        .into_iter()
        .filter(|row| row.len() >= 6 && row[2] == "security" && row[5] == "needed")
        .map(|row| (row[1].clone(), row[3] == "critical"))
        .collect()
}

/// Packages a `zypper update`/`patch` run upgraded, from its "going to be upgraded" block.
pub fn parse_upgraded(output: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_block = false;
    for line in output.lines() {
        if line.contains("going to be upgraded") {
            in_block = true;
            continue;
        }
        if in_block {
            if line.trim().is_empty() || !line.starts_with(' ') {
                in_block = false;
                continue;
            }
            names.extend(line.split_whitespace().map(String::from));
        }
    }
    names
}

impl Patcher for Zypper {
    fn name(&self) -> &'static str {
        "zypper"
    }

    fn apply<'a>(
        &'a self,
        selection: &'a PatchSelection,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<PatchResults, PatchError>> {
        Box::pin(async move {
            let wants_all = selection
                .classifications
                .iter()
                .any(|c| matches!(c, PatchClassification::All | PatchClassification::Bugfix));
            let reboot_codes = [0, EXIT_REBOOT_NEEDED, EXIT_RESTART_NEEDED];
            if !wants_all {
                // Security and critical fixes come as patches, which name no single package.
                if !selection.exclude.is_empty() {
                    return Err(PatchError::Unsupported(
                        "zypper installs security patches as a whole and cannot exclude packages from them; lock the packages on the host (zypper addlock) instead".into(),
                    ));
                }
                let listed = run(
                    &self.commands.spec(
                        "zypper",
                        &["-n", "-q", "list-patches", "--category", "security"],
                        &[],
                        timeout,
                    ),
                    &[0, 100, 101],
                )
                .await?;
                let patches = parse_list_patches(&listed.stdout);
                let critical_only = !selection
                    .classifications
                    .contains(&PatchClassification::Security);
                let mut args = vec!["-n", "patch", "--category", "security"];
                if critical_only {
                    args.extend(["--severity", "critical"]);
                }
                let outcome = run(
                    &self.commands.spec("zypper", &args, &[], timeout),
                    &reboot_codes,
                )
                .await?;
                let upgraded = parse_upgraded(&outcome.stdout);
                let mut results = PatchResults {
                    phase: ActionPhase::Succeeded,
                    patcher: Some(self.name().into()),
                    reboot_required: outcome.end
                        == crate::agent::process::ProcessEnd::Exited(EXIT_REBOOT_NEEDED),
                    installed: upgraded
                        .into_iter()
                        .map(|name| crate::api::patchjob::PatchOutcome {
                            name,
                            version: None,
                            message: None,
                        })
                        .collect(),
                    ..Default::default()
                };
                results.message = format!(
                    "{}; {} security patch(es) were needed",
                    summary(&results),
                    patches.len()
                );
                return Ok(results);
            }
            let listed = run(
                &self
                    .commands
                    .spec("zypper", &["-n", "-q", "list-updates"], &[], timeout),
                &[0, 100],
            )
            .await?;
            let wanted = select(parse_list_updates(&listed.stdout), selection);
            if wanted.is_empty() {
                return Ok(results(self.name(), &[], &Default::default(), false));
            }
            let mut args: Vec<String> = vec!["-n".into(), "update".into()];
            args.extend(wanted.iter().map(|u| u.name.clone()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let outcome = run(
                &self.commands.spec("zypper", &args, &[], timeout),
                &reboot_codes,
            )
            .await?;
            let mut query = vec!["-q", "--qf", super::dnf::RPM_QUERY_FORMAT];
            query.extend(wanted.iter().map(|u| u.name.as_str()));
            let installed = run(&self.commands.spec("rpm", &query, &[], timeout), &[0, 1]).await?;
            let reboot =
                outcome.end == crate::agent::process::ProcessEnd::Exited(EXIT_REBOOT_NEEDED);
            Ok(results(
                self.name(),
                &wanted,
                &super::dnf::parse_rpm_query(&installed.stdout),
                reboot,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from `zypper -q list-updates` on openSUSE Leap 15.5.
    const LIST_UPDATES: &str = "\
S | Repository             | Name        | Current Version | Available Version | Arch
--+------------------------+-------------+-----------------+-------------------+-------
v | Update repository 15.5 | libopenssl3 | 3.0.8-150500.5.27.1 | 3.0.8-150500.5.30.1 | x86_64
v | Update repository 15.5 | vim         | 9.1.0111-150500.20.9.1 | 9.1.0330-150500.20.12.1 | x86_64
";

    // Recorded from `zypper -q list-patches --category security`.
    const LIST_PATCHES: &str = "\
Repository             | Name                          | Category | Severity  | Interactive | Status | Summary
-----------------------+-------------------------------+----------+-----------+-------------+--------+-----------------------------
Update repository 15.5 | openSUSE-SLE-15.5-2024-1651   | security | important | ---         | needed | Security update for openssl
Update repository 15.5 | openSUSE-SLE-15.5-2024-1700   | security | critical  | ---         | needed | Security update for glibc
Update repository 15.5 | openSUSE-SLE-15.5-2024-1200   | security | moderate  | ---         | applied | Security update for curl
";

    // Recorded from `zypper -n update vim`.
    const UPDATE: &str = "\
Loading repository data...
Reading installed packages...
Resolving package dependencies...

The following 2 packages are going to be upgraded:
  vim vim-data-common

2 packages to upgrade.
Overall download size: 2.1 MiB. Already cached: 0 B. After the operation, additional 12.0 KiB will be used.
Continue? [y/n/v/...? shows all options] (y): y
";

    #[test]
    fn list_updates_table() {
        let updates = parse_list_updates(LIST_UPDATES);
        assert_eq!(updates.len(), 2);
        assert_eq!(updates[0].name, "libopenssl3");
        assert_eq!(updates[1].new_version, "9.1.0330-150500.20.12.1");
    }

    #[test]
    fn needed_security_patches_and_their_severity() {
        let patches = parse_list_patches(LIST_PATCHES);
        assert_eq!(patches.len(), 2, "applied patches are not needed");
        assert!(patches["openSUSE-SLE-15.5-2024-1700"]);
        assert!(!patches["openSUSE-SLE-15.5-2024-1651"]);
    }

    #[test]
    fn upgraded_packages_from_the_transaction_summary() {
        assert_eq!(parse_upgraded(UPDATE), ["vim", "vim-data-common"]);
    }
}
