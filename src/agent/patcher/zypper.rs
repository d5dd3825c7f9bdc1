//! zypper (SUSE, openSUSE): `list-updates` for package candidates, `list-patches`
//! for security and critical patches, `update` of the chosen packages (a dry run first
//! holds back what would change an excluded package), and zypper's exit codes: 102
//! (reboot needed, as `needs-rebooting` also says), 103 (zypper updated itself: run it
//! again for the rest), 106 and 107 (done, with a warning).

use std::time::Duration;

use crate::agent::process::{ProcessEnd, ProcessOutcome};
use crate::api::patchjob::{ActionPhase, PatchOutcome, PatchResults};
use crate::api::plan::{PatchClassification, PatchSelection};

use super::{
    Applying, Commands, PatchError, Patcher, Update, add_failures, hold_back_for_exclusions,
    results, run, select, summary,
};

/// zypper's "reboot needed" exit code.
pub const EXIT_REBOOT_NEEDED: i32 = 102;
/// zypper's "restart zypper (it updated itself)" exit code.
pub const EXIT_RESTART_NEEDED: i32 = 103;
/// Some repositories could not be refreshed and were skipped; the rest worked.
pub const EXIT_REPOS_SKIPPED: i32 = 106;
/// Packages were installed but an RPM scriptlet of one of them failed.
pub const EXIT_RPM_SCRIPT_FAILED: i32 = 107;
/// Times zypper runs a transaction that keeps saying it updated itself.
pub const MAX_RESTARTS: usize = 3;

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
            arch: Some(row[5].clone()),
            security: false,
            critical: false,
            bugfix: false,
        })
        .collect()
}

/// The `zypper patch` filters for `classifications`, as zypper's patch categories
/// define them: Security is the category `security`; Critical is `security` with
/// severity `critical` (nothing more when Security is asked for too); Bugfix is
/// `recommended`, the category of bug fixes. `All` is not a patch filter: it updates
/// every package.
pub fn patch_filters(classifications: &[PatchClassification]) -> Vec<Vec<&'static str>> {
    let wants = |c| classifications.contains(&c);
    let mut filters = Vec::new();
    if wants(PatchClassification::Security) {
        filters.push(vec!["--category", "security"]);
    } else if wants(PatchClassification::Critical) {
        filters.push(vec!["--category", "security", "--severity", "critical"]);
    }
    if wants(PatchClassification::Bugfix) {
        filters.push(vec!["--category", "recommended"]);
    }
    filters
}

/// Needed patches of `category` in `list-patches` output.
fn count_needed(output: &str, category: &str) -> usize {
    table_rows(output)
        .into_iter()
        .filter(|row| row.len() >= 6 && row[2] == category && row[5] == "needed")
        .count()
}

/// Packages listed in the transaction summary blocks whose header contains `what`
/// ("going to be upgraded", "going to be installed", ...).
fn transaction_block(output: &str, what: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_block = false;
    for line in output.lines() {
        if line.starts_with("The following") && what.iter().any(|w| line.contains(w)) {
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

/// Packages a `zypper update`/`patch` run upgraded, from its "going to be upgraded" block.
pub fn parse_upgraded(output: &str) -> Vec<String> {
    transaction_block(output, &["going to be upgraded"])
}

/// Every package a (dry) run changes: upgraded, newly installed, downgraded or removed.
pub fn parse_changes(output: &str) -> Vec<String> {
    transaction_block(
        output,
        &[
            "going to be upgraded",
            "going to be installed",
            "going to be downgraded",
            "going to be REMOVED",
        ],
    )
}

/// A transaction run to its end: every run's output, and whether one asked for a reboot
/// or ended with a warning.
struct Transaction {
    upgraded: Vec<String>,
    reboot: bool,
    warnings: Vec<String>,
    last: ProcessOutcome,
}

fn warning(code: i32) -> Option<&'static str> {
    match code {
        EXIT_REPOS_SKIPPED => Some("zypper skipped repositories it could not refresh (exit 106)"),
        EXIT_RPM_SCRIPT_FAILED => {
            Some("an RPM scriptlet failed while installing (exit 107); the packages are installed")
        }
        _ => None,
    }
}

impl Zypper {
    /// zypper with `args`, waiting for the package manager lock (held by another zypper,
    /// YaST or PackageKit) up to `timeout` instead of failing at once.
    fn spec(&self, args: &[&str], timeout: Duration) -> crate::agent::process::ProcessSpec {
        let wait = timeout.as_secs().to_string();
        self.commands
            .spec("zypper", args, &[("ZYPP_LOCK_TIMEOUT", &wait)], timeout)
    }

    /// Runs a transaction, again while zypper says it updated itself and must be
    /// restarted for the rest (exit 103).
    async fn transaction(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Transaction, PatchError> {
        let ok = [
            0,
            EXIT_REBOOT_NEEDED,
            EXIT_RESTART_NEEDED,
            EXIT_REPOS_SKIPPED,
            EXIT_RPM_SCRIPT_FAILED,
        ];
        let mut upgraded = Vec::new();
        let mut reboot = false;
        let mut warnings = Vec::new();
        let mut runs = 0;
        loop {
            runs += 1;
            let outcome = run(&self.spec(args, timeout), &ok).await?;
            upgraded.extend(parse_upgraded(&outcome.stdout));
            // run() accepts only the exit codes in `ok`.
            let code = match outcome.end {
                ProcessEnd::Exited(code) => code,
                _ => 0,
            };
            reboot |= code == EXIT_REBOOT_NEEDED;
            warnings.extend(warning(code).map(String::from));
            if code != EXIT_RESTART_NEEDED {
                return Ok(Transaction {
                    upgraded,
                    reboot,
                    warnings,
                    last: outcome,
                });
            }
            if runs == MAX_RESTARTS {
                return Err(PatchError::Command {
                    command: format!("zypper {}", args.join(" ")),
                    message: format!(
                        "zypper still asks to be restarted (exit 103) after {MAX_RESTARTS} runs"
                    ),
                });
            }
        }
    }

    /// `zypper needs-rebooting` exits 102 when core libraries or the kernel changed.
    async fn needs_rebooting(&self, timeout: Duration) -> bool {
        matches!(
            crate::agent::process::run(&self.spec(&["-n", "needs-rebooting"], timeout)).await,
            Ok(outcome) if outcome.end == ProcessEnd::Exited(EXIT_REBOOT_NEEDED)
        )
    }

    /// The packages updating `packages` would change, from a dry run.
    async fn simulate_update(
        &self,
        packages: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<String>, PatchError> {
        let mut args = vec!["-n", "update", "--dry-run", "--auto-agree-with-licenses"];
        args.extend(packages.iter().map(String::as_str));
        let ok = [0, EXIT_REBOOT_NEEDED, EXIT_REPOS_SKIPPED];
        let outcome = run(&self.spec(&args, timeout), &ok).await?;
        Ok(parse_changes(&outcome.stdout))
    }
}

fn with_warnings(mut results: PatchResults, warnings: &[String]) -> PatchResults {
    for warning in warnings {
        results.message = format!("{}; warning: {warning}", results.message);
    }
    results
}

impl Zypper {
    /// Patches of the categories the classifications name ([`patch_filters`]): `zypper
    /// patch` per filter, as often as it updates itself.
    async fn apply_patches(
        &self,
        selection: &PatchSelection,
        timeout: Duration,
    ) -> Result<PatchResults, PatchError> {
        let mut warnings = Vec::new();
        let mut results = PatchResults {
            phase: ActionPhase::Succeeded,
            patcher: Some(self.name().into()),
            ..Default::default()
        };
        let mut needed = Vec::new();
        for filter in patch_filters(&selection.classifications) {
            let mut list = vec!["-n", "-q", "list-patches"];
            list.extend(filter.iter().copied());
            let listed = run(
                &self.spec(&list, timeout),
                &[0, 100, 101, EXIT_REPOS_SKIPPED],
            )
            .await?;
            warnings.extend(
                warning(match listed.end {
                    ProcessEnd::Exited(code) => code,
                    _ => 0,
                })
                .map(String::from),
            );
            needed.push(format!(
                "{} {} patch(es) were needed",
                count_needed(&listed.stdout, filter[1]),
                filter[1]
            ));
            let mut args = vec!["-n", "patch", "--auto-agree-with-licenses"];
            args.extend(filter.iter().copied());
            let transaction = self.transaction(&args, timeout).await?;
            warnings.extend(transaction.warnings);
            results.reboot_required |= transaction.reboot;
            results
                .installed
                .extend(transaction.upgraded.into_iter().map(|name| PatchOutcome {
                    name,
                    version: None,
                    message: None,
                }));
        }
        results.message = format!("{}; {}", summary(&results), needed.join(", "));
        Ok(with_warnings(results, &warnings))
    }

    /// Package updates: those `selection` picks from `list-updates`, less those that
    /// would change an excluded package.
    async fn apply_updates(
        &self,
        selection: &PatchSelection,
        timeout: Duration,
    ) -> Result<PatchResults, PatchError> {
        let mut warnings = Vec::new();
        let listed = run(
            &self.spec(&["-n", "-q", "list-updates"], timeout),
            &[0, 100, EXIT_REPOS_SKIPPED],
        )
        .await?;
        if listed.end == ProcessEnd::Exited(EXIT_REPOS_SKIPPED) {
            warnings.extend(warning(EXIT_REPOS_SKIPPED).map(String::from));
        }
        let (wanted, held_back) = hold_back_for_exclusions(
            select(parse_list_updates(&listed.stdout), selection),
            &selection.exclude,
            |packages| self.simulate_update(packages, timeout),
        )
        .await?;
        if wanted.is_empty() {
            let mut results = results(
                self.name(),
                &[],
                &Default::default(),
                false,
                selection.fail_when,
            );
            add_failures(&mut results, held_back, selection.fail_when);
            return Ok(with_warnings(results, &warnings));
        }
        let mut args: Vec<&str> = vec!["-n", "update", "--auto-agree-with-licenses"];
        args.extend(wanted.iter().map(|u| u.name.as_str()));
        let transaction = self.transaction(&args, timeout).await?;
        warnings.extend(transaction.warnings);
        let mut query = vec!["-q", "--qf", super::dnf::RPM_QUERY_FORMAT];
        query.extend(wanted.iter().map(|u| u.name.as_str()));
        let installed = run(&self.commands.spec("rpm", &query, &[], timeout), &[0, 1]).await?;
        let mut results = results(
            self.name(),
            &wanted,
            &super::dnf::parse_rpm_query(&installed.stdout),
            transaction.reboot,
            selection.fail_when,
        );
        if !results.failed.is_empty() {
            results.message = format!("{}\n{}", results.message, transaction.last.output_tail);
        }
        add_failures(&mut results, held_back, selection.fail_when);
        Ok(with_warnings(results, &warnings))
    }
}

impl Patcher for Zypper {
    fn name(&self) -> &'static str {
        "zypper"
    }

    fn apply<'a>(&'a self, selection: &'a PatchSelection, timeout: Duration) -> Applying<'a> {
        Box::pin(async move {
            let wants_all = selection
                .classifications
                .contains(&PatchClassification::All);
            let mut results = if wants_all {
                self.apply_updates(selection, timeout).await?
            } else {
                // Security, critical and bug fixes come as patches, which name no single package.
                if !selection.exclude.is_empty() {
                    return Err(PatchError::Unsupported(
                        "zypper installs patches (Security, Critical, Bugfix) as a whole and cannot exclude packages from them; lock the packages on the host (zypper addlock) instead".into(),
                    ));
                }
                let mut results = self.apply_patches(selection, timeout).await?;
                // The packages the plan names in include come on top, as on apt and dnf.
                if !selection.include.is_empty() {
                    let named = PatchSelection {
                        classifications: Vec::new(),
                        ..selection.clone()
                    };
                    let updates = self.apply_updates(&named, timeout).await?;
                    results.installed.extend(updates.installed);
                    results.failed.extend(updates.failed);
                    results.reboot_required |= updates.reboot_required;
                    super::settle(&mut results, selection.fail_when);
                    results.message = format!("{}; included: {}", results.message, updates.message);
                }
                results
            };
            results.reboot_required |= self.needs_rebooting(timeout).await;
            Ok(results)
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
    fn classifications_map_to_patch_categories_and_never_to_every_update() {
        use PatchClassification::{Bugfix, Critical, Security};
        assert_eq!(
            patch_filters(&[Bugfix]),
            [vec!["--category", "recommended"]]
        );
        assert_eq!(
            patch_filters(&[Critical]),
            [vec!["--category", "security", "--severity", "critical"]]
        );
        assert_eq!(
            patch_filters(&[Security, Critical]),
            [vec!["--category", "security"]]
        );
        // Severity applies to every category of one command: Critical's filter stays
        // apart from Bugfix's, so bug fixes of any severity are found.
        assert_eq!(
            patch_filters(&[Critical, Bugfix]),
            [
                vec!["--category", "security", "--severity", "critical"],
                vec!["--category", "recommended"]
            ]
        );
        assert!(patch_filters(&[PatchClassification::All]).is_empty());
        assert_eq!(count_needed(LIST_PATCHES, "security"), 2);
    }

    #[test]
    fn upgraded_packages_from_the_transaction_summary() {
        assert_eq!(parse_upgraded(UPDATE), ["vim", "vim-data-common"]);
    }

    #[test]
    fn a_dry_run_lists_every_package_it_would_change() {
        let dry_run = "\
Loading repository data...
Reading installed packages...
Resolving package dependencies...

The following NEW package is going to be installed:
  libopenssl3-32bit

The following 2 packages are going to be upgraded:
  libopenssl3 openssl-3

2 packages to upgrade, 1 new.
";
        assert_eq!(
            parse_changes(dry_run),
            ["libopenssl3-32bit", "libopenssl3", "openssl-3"]
        );
        assert_eq!(parse_upgraded(dry_run), ["libopenssl3", "openssl-3"]);
    }
}
