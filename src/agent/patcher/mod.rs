//! Patchers: one trait over apt, dnf/yum, zypper and Windows Update. Each finds the
//! updates the plan selects, installs them, and reports what was installed, what
//! failed and whether the host needs a reboot. Command construction and output parsing
//! are pure functions, tested against recorded outputs; only `apply` runs commands,
//! always with `LC_ALL=C` so the output parsed is the untranslated one.

pub mod apt;
pub mod dnf;
pub mod windows;
pub mod zypper;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::api::patchjob::{ActionPhase, PatchOutcome, PatchResults};
use crate::api::plan::{PatchClassification, PatchFailWhen, PatchSelection};

use super::process::{self, ProcessEnd, ProcessOutcome, ProcessSpec};

/// One available update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub name: String,
    pub current_version: Option<String>,
    pub new_version: String,
    /// Architecture, where the package manager says (apt: `amd64`, `all`, ...).
    pub arch: Option<String>,
    /// Security (or critical) fix, as the package source classifies it.
    pub security: bool,
    pub critical: bool,
    /// Bug fix, as the package source classifies it (dnf's bugfix advisories).
    pub bugfix: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A package manager that can patch this host.
pub trait Patcher: Send + Sync {
    /// `apt`, `dnf`, `yum`, `zypper` or `windows-update`.
    fn name(&self) -> &'static str;
    /// Installs the updates `selection` asks for, within `timeout`.
    fn apply<'a>(&'a self, selection: &'a PatchSelection, timeout: Duration) -> Applying<'a>;
}

/// What [`Patcher::apply`] returns: the patch run, boxed so patchers stay objects.
pub type Applying<'a> = BoxFuture<'a, Result<PatchResults, PatchError>>;

/// The patcher for this host: Windows Update on Windows, else the first of apt-get,
/// dnf, yum and zypper found on `PATH`.
pub fn detect() -> Option<Box<dyn Patcher>> {
    if cfg!(windows) {
        return Some(Box::new(windows::WindowsUpdate));
    }
    if find_program("apt-get").is_some() {
        return Some(Box::new(apt::Apt::default()));
    }
    if find_program("dnf").is_some() {
        return Some(Box::new(dnf::Dnf::new(dnf::Flavour::Dnf)));
    }
    if find_program("yum").is_some() {
        return Some(Box::new(dnf::Dnf::new(dnf::Flavour::Yum)));
    }
    if find_program("zypper").is_some() {
        return Some(Box::new(zypper::Zypper::default()));
    }
    None
}

/// Full path of `program` on `PATH`.
/// `program` on `PATH` — on the host's file system when children run in the host's
/// namespaces (a node agent's container has no package manager of its own).
pub fn find_program(program: &str) -> Option<PathBuf> {
    find_program_in(super::process::host_root().as_deref(), program)
}

fn find_program_in(root: Option<&Path>, program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| match root {
            Some(root) => root
                .join(dir.strip_prefix("/").unwrap_or(&dir))
                .join(program),
            None => dir.join(program),
        })
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// The updates `selection` asks for: by classification, plus `include`, minus `exclude`.
/// A classification selects only the updates the package source marks so; only `All`
/// selects everything.
pub fn select(updates: Vec<Update>, selection: &PatchSelection) -> Vec<Update> {
    let wants = |c| selection.classifications.contains(&c);
    let all = wants(PatchClassification::All);
    let (security, critical, bugfix) = (
        wants(PatchClassification::Security),
        wants(PatchClassification::Critical),
        wants(PatchClassification::Bugfix),
    );
    updates
        .into_iter()
        .filter(|u| !is_excluded(&selection.exclude, &u.name))
        .filter(|u| {
            all || (security && u.security)
                || (critical && u.critical)
                || (bugfix && u.bugfix)
                || selection
                    .include
                    .iter()
                    .any(|i| *i == u.name || i == base_name(&u.name))
        })
        .collect()
}

/// How a patcher runs its package manager and helpers.
#[derive(Clone, Debug, Default)]
pub struct Commands {
    /// `PATH` to find them on; `None` keeps the agent's. (Tests put fake package
    /// managers first.)
    pub path: Option<String>,
    /// More variables for every command. `LC_ALL` and `PATH` are the patcher's own and
    /// cannot be set here. (Tests point apt and dpkg at a package database of their own
    /// with `APT_CONFIG`, `DPKG_ROOT` and `DPKG_ADMINDIR`.)
    pub env: BTreeMap<String, String>,
}

impl Commands {
    /// A command the patcher runs, with its output kept for parsing: `LC_ALL=C`, since
    /// the parsers read the untranslated output (zypper's tables, dnf's messages).
    pub(crate) fn spec(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> ProcessSpec {
        let mut env: BTreeMap<String, String> = self
            .env
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("PATH") && !k.eq_ignore_ascii_case("LC_ALL"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        env.insert("LC_ALL".into(), "C".into());
        if let Some(path) = &self.path {
            env.insert("PATH".into(), path.clone());
        }
        ProcessSpec {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            current_dir: None,
            timeout,
            capture_stdout: true,
            ..ProcessSpec::default()
        }
    }
}

/// A package name without its `:arch` qualifier.
pub(crate) fn base_name(name: &str) -> &str {
    name.split_once(':').map_or(name, |(base, _)| base)
}

pub(crate) fn is_excluded(exclude: &[String], name: &str) -> bool {
    exclude.iter().any(|e| e == name || e == base_name(name))
}

/// Splits `wanted` into the updates that can be installed without changing a package
/// the plan excludes, and the others, each with a message naming what it would have
/// brought along. `simulate(names)` tells which packages installing `names` would
/// upgrade, install or remove (the package manager's dry run). `exclude` is a promise
/// that those packages are never changed, also as another update's dependency.
pub(crate) async fn hold_back_for_exclusions<F, Fut>(
    wanted: Vec<Update>,
    exclude: &[String],
    simulate: F,
) -> Result<(Vec<Update>, Vec<PatchOutcome>), PatchError>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Vec<String>, PatchError>>,
{
    let names = |updates: &[Update]| updates.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
    let touches = |changed: &[String]| {
        changed
            .iter()
            .filter(|name| is_excluded(exclude, name))
            .cloned()
            .collect::<Vec<_>>()
    };
    if exclude.is_empty()
        || wanted.is_empty()
        || touches(&simulate(names(&wanted)).await?).is_empty()
    {
        return Ok((wanted, Vec::new()));
    }
    let held = |update: &Update, excluded: &[String], together: bool| PatchOutcome {
        name: update.name.clone(),
        version: update.current_version.clone(),
        message: Some(format!(
            "not installed: {together}{name} {version} would also change {excluded}, which the plan excludes",
            together = if together {
                "with the other selected updates, "
            } else {
                ""
            },
            name = update.name,
            version = update.new_version,
            excluded = excluded.join(", "),
        )),
    };
    let mut allowed = Vec::new();
    let mut blocked = Vec::new();
    for update in wanted {
        let excluded = touches(&simulate(vec![update.name.clone()]).await?);
        if excluded.is_empty() {
            allowed.push(update);
        } else {
            blocked.push(held(&update, &excluded, false));
        }
    }
    // Together they can still need what none needs alone; then none is installed.
    if !allowed.is_empty() {
        let excluded = touches(&simulate(names(&allowed)).await?);
        if !excluded.is_empty() {
            for update in allowed.drain(..) {
                blocked.push(held(&update, &excluded, true));
            }
        }
    }
    Ok((allowed, blocked))
}

/// The patch step's phase from what installed and what failed. JetPatch counts
/// patching as failed only when no patch succeeded: with `AllFailed` the step fails only
/// when patches were wanted and none installed; with `AnyFailed` one failure is enough.
pub fn verdict(installed: usize, failed: usize, fail_when: PatchFailWhen) -> ActionPhase {
    match (installed, failed, fail_when) {
        (_, 0, _) => ActionPhase::Succeeded,
        (0, _, _) | (_, _, PatchFailWhen::AnyFailed) => ActionPhase::Failed,
        (_, _, PatchFailWhen::AllFailed) => ActionPhase::Succeeded,
    }
}

/// Sets `results.phase` by [`verdict`] from its lists.
pub(crate) fn settle(results: &mut PatchResults, fail_when: PatchFailWhen) {
    results.phase = verdict(results.installed.len(), results.failed.len(), fail_when);
}

/// Adds failures found before anything ran (updates held back) to `results`.
pub(crate) fn add_failures(
    results: &mut PatchResults,
    failures: Vec<PatchOutcome>,
    fail_when: PatchFailWhen,
) {
    if failures.is_empty() {
        return;
    }
    results.failed.extend(failures);
    settle(results, fail_when);
    results.message = summary(results);
}

/// Runs `spec`; `ok_codes` are the exit codes that are not errors.
pub(crate) async fn run(
    spec: &ProcessSpec,
    ok_codes: &[i32],
) -> Result<ProcessOutcome, PatchError> {
    let shown = format!("{} {}", spec.program.display(), spec.args.join(" "));
    let outcome = process::run(spec)
        .await
        .map_err(|err| PatchError::Command {
            command: shown.clone(),
            message: err.to_string(),
        })?;
    match outcome.end {
        ProcessEnd::Exited(code) if ok_codes.contains(&code) => Ok(outcome),
        ProcessEnd::TimedOut => Err(PatchError::Command {
            command: shown,
            message: "timed out".into(),
        }),
        ref end => Err(PatchError::Command {
            command: shown,
            message: format!("{end:?}: {}", outcome.output_tail),
        }),
    }
}

/// Compares what was asked for with the versions installed afterwards.
pub(crate) fn results(
    patcher: &str,
    wanted: &[Update],
    installed_after: &BTreeMap<String, String>,
    reboot_required: bool,
    fail_when: PatchFailWhen,
) -> PatchResults {
    let mut results = PatchResults {
        phase: ActionPhase::Succeeded,
        patcher: Some(patcher.to_string()),
        reboot_required,
        ..Default::default()
    };
    for update in wanted {
        match installed_after.get(&update.name) {
            Some(version) if *version == update.new_version => {
                results.installed.push(PatchOutcome {
                    name: update.name.clone(),
                    version: Some(version.clone()),
                    message: None,
                })
            }
            other => results.failed.push(PatchOutcome {
                name: update.name.clone(),
                version: other.cloned(),
                message: Some(format!(
                    "wanted {}, found {}",
                    update.new_version,
                    other.map_or("nothing", String::as_str)
                )),
            }),
        }
    }
    settle(&mut results, fail_when);
    results.message = summary(&results);
    results
}

pub(crate) fn summary(results: &PatchResults) -> String {
    match (results.installed.len(), results.failed.len()) {
        (0, 0) => "no updates selected".to_string(),
        (installed, 0) => format!("{installed} update(s) installed"),
        (installed, failed) => format!("{installed} update(s) installed, {failed} failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn programs_are_found_under_the_host_root_when_given() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let program = bin.join("fleetpatch-test-package-manager");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find_program_in(Some(root.path()), "fleetpatch-test-package-manager"),
            Some(program)
        );
        assert_eq!(
            find_program_in(None, "fleetpatch-test-package-manager"),
            None
        );
    }

    fn update(name: &str, security: bool, critical: bool) -> Update {
        Update {
            name: name.into(),
            current_version: None,
            new_version: "2".into(),
            arch: None,
            security,
            critical,
            bugfix: false,
        }
    }

    fn names(updates: &[Update]) -> Vec<&str> {
        updates.iter().map(|u| u.name.as_str()).collect()
    }

    #[test]
    fn selection_by_classification_include_and_exclude() {
        let updates = vec![
            update("openssl", true, true),
            update("curl", true, false),
            update("vim", false, false),
        ];
        let mut selection = PatchSelection::default();
        assert_eq!(
            names(&select(updates.clone(), &selection)),
            ["openssl", "curl"]
        );
        selection.classifications = vec![PatchClassification::Critical];
        assert_eq!(names(&select(updates.clone(), &selection)), ["openssl"]);
        selection.include = vec!["vim".into()];
        selection.exclude = vec!["openssl".into()];
        assert_eq!(names(&select(updates.clone(), &selection)), ["vim"]);
        selection.classifications = vec![PatchClassification::All];
        selection.exclude = vec![];
        assert_eq!(
            names(&select(updates.clone(), &selection)),
            ["openssl", "curl", "vim"]
        );
    }

    #[test]
    fn bugfix_selects_only_updates_marked_as_bug_fixes() {
        let mut fix = update("tzdata", false, false);
        fix.bugfix = true;
        let updates = vec![
            update("openssl", true, true),
            fix,
            update("vim", false, false),
        ];
        let selection = PatchSelection {
            classifications: vec![PatchClassification::Bugfix],
            ..PatchSelection::default()
        };
        assert_eq!(names(&select(updates.clone(), &selection)), ["tzdata"]);
        let selection = PatchSelection {
            classifications: vec![PatchClassification::Security, PatchClassification::Bugfix],
            ..PatchSelection::default()
        };
        assert_eq!(names(&select(updates, &selection)), ["openssl", "tzdata"]);
    }

    #[test]
    fn patcher_commands_read_untranslated_output() {
        let spec =
            Commands::default().spec("zypper", &["-n"], &[("A", "b")], Duration::from_secs(1));
        assert_eq!(spec.env["LC_ALL"], "C");
        assert_eq!(spec.env["A"], "b");
        assert!(!spec.env.contains_key("PATH"));
        let spec = Commands {
            path: None,
            env: BTreeMap::from([("PATH".to_string(), "/elsewhere".to_string())]),
        }
        .spec("zypper", &[], &[], Duration::from_secs(1));
        assert!(!spec.env.contains_key("PATH"), "the agent's PATH is kept");
        let spec = Commands {
            path: Some("/tmp/fake:/usr/bin".into()),
            env: BTreeMap::from([
                ("APT_CONFIG".to_string(), "/tmp/apt.conf".to_string()),
                ("LC_ALL".to_string(), "de_DE.UTF-8".to_string()),
                ("PATH".to_string(), "/elsewhere".to_string()),
            ]),
        }
        .spec("zypper", &[], &[], Duration::from_secs(1));
        assert_eq!(spec.env["PATH"], "/tmp/fake:/usr/bin");
        assert_eq!(spec.env["APT_CONFIG"], "/tmp/apt.conf");
        assert_eq!(
            spec.env["LC_ALL"], "C",
            "the parsers need untranslated output"
        );
    }

    #[tokio::test]
    async fn an_excluded_dependency_holds_back_only_its_dependants() {
        // openssl needs the excluded libssl3; curl needs nothing new.
        let simulate = |names: Vec<String>| async move {
            let mut changed = names.clone();
            if names.iter().any(|n| n == "openssl") {
                changed.push("libssl3:amd64".into());
            }
            Ok::<_, PatchError>(changed)
        };
        let wanted = vec![update("openssl", true, true), update("curl", true, false)];
        let (allowed, held) =
            hold_back_for_exclusions(wanted.clone(), &["libssl3".into()], simulate)
                .await
                .unwrap();
        assert_eq!(names(&allowed), ["curl"]);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].name, "openssl");
        assert_eq!(
            held[0].message.as_deref(),
            Some(
                "not installed: openssl 2 would also change libssl3:amd64, which the plan excludes"
            )
        );
        let (allowed, held) = hold_back_for_exclusions(wanted, &[], simulate)
            .await
            .unwrap();
        assert_eq!(allowed.len(), 2);
        assert!(held.is_empty());
    }

    #[test]
    fn results_compare_wanted_and_installed_versions() {
        let wanted = vec![update("a", false, false), update("b", false, false)];
        let after = BTreeMap::from([
            ("a".to_string(), "2".to_string()),
            ("b".to_string(), "1".to_string()),
        ]);
        let results = results("apt", &wanted, &after, true, PatchFailWhen::AllFailed);
        assert_eq!(
            results.phase,
            ActionPhase::Succeeded,
            "one of two installed: patching did not fail (JetPatch)"
        );
        assert_eq!(results.installed.len(), 1);
        assert_eq!(
            results.failed[0].message.as_deref(),
            Some("wanted 2, found 1")
        );
        assert!(results.reboot_required);
        assert_eq!(results.message, "1 update(s) installed, 1 failed");
        let strict = super::results("apt", &wanted, &after, true, PatchFailWhen::AnyFailed);
        assert_eq!(strict.phase, ActionPhase::Failed);
    }

    #[test]
    fn the_patch_step_fails_only_when_the_rule_says() {
        use ActionPhase::{Failed, Succeeded};
        use PatchFailWhen::{AllFailed, AnyFailed};
        // (installed, failed) -> phase under AllFailed, under AnyFailed
        for (installed, failed, all, any) in [
            (0, 0, Succeeded, Succeeded),
            (3, 0, Succeeded, Succeeded),
            (2, 1, Succeeded, Failed),
            (0, 1, Failed, Failed),
            (0, 4, Failed, Failed),
        ] {
            assert_eq!(
                verdict(installed, failed, AllFailed),
                all,
                "{installed}/{failed}"
            );
            assert_eq!(
                verdict(installed, failed, AnyFailed),
                any,
                "{installed}/{failed}"
            );
        }
        let mut held = PatchResults::default();
        let outcome = |name: &str| PatchOutcome {
            name: name.into(),
            ..PatchOutcome::default()
        };
        held.installed.push(outcome("curl"));
        add_failures(&mut held, vec![outcome("openssl")], AllFailed);
        assert_eq!(held.phase, Succeeded);
        add_failures(&mut held, vec![outcome("libssl3")], AnyFailed);
        assert_eq!(held.phase, Failed);
    }
}
