//! dnf and yum (RHEL, Fedora, Rocky, Amazon Linux): `check-update` for candidates,
//! `updateinfo` for security and critical advisories, `upgrade` for the chosen
//! packages with the plan's exclusions passed to the package manager (so no dependency
//! is upgraded past them either), `rpm -q` to see what is installed, `needs-restarting
//! -r` for reboots.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::agent::process::ProcessEnd;
use crate::api::patchjob::PatchResults;
use crate::api::plan::{PatchClassification, PatchSelection};

use super::{Applying, Commands, PatchError, Patcher, Update, results, run, select, summary};

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

/// Packages after whose update `needs-restarting -r` says a reboot is needed; the
/// agent's own answer when that command is missing (dnf without dnf-plugins-core).
pub const REBOOT_PACKAGES: &[&str] = &[
    "kernel",
    "kernel-core",
    "kernel-rt",
    "glibc",
    "linux-firmware",
    "systemd",
    "dbus",
    "dbus-broker",
    "dbus-daemon",
    "microcode_ctl",
];

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

    /// Arguments that list bug-fix advisories with their packages.
    pub fn bugfix_advisories_args(&self) -> Vec<&'static str> {
        match self.flavour {
            Flavour::Dnf => vec!["-q", "updateinfo", "list", "--bugfix", "--available"],
            Flavour::Yum => vec!["-q", "updateinfo", "list", "bugfix", "available"],
        }
    }

    /// Arguments that list every available advisory, of any type.
    pub fn all_advisories_args(&self) -> Vec<&'static str> {
        match self.flavour {
            Flavour::Dnf => vec!["-q", "updateinfo", "list", "--available"],
            Flavour::Yum => vec!["-q", "updateinfo", "list", "available"],
        }
    }

    /// Arguments that upgrade exactly `packages` and change nothing in `exclude`, not
    /// even as a dependency. A package that cannot be upgraded without an excluded one
    /// is skipped (`--skip-broken`, and for dnf not insisting on the newest version),
    /// instead of failing every other upgrade with it.
    pub fn upgrade_args(&self, packages: &[String], exclude: &[String]) -> Vec<String> {
        let mut args = vec!["-y".to_string()];
        args.extend(exclusions(exclude));
        args.push("--skip-broken".into());
        let verb = match self.flavour {
            Flavour::Dnf => {
                args.push("--setopt=best=False".into());
                "upgrade"
            }
            Flavour::Yum => "update",
        };
        args.push(verb.to_string());
        args.extend(packages.iter().cloned());
        args
    }
}

fn exclusions(exclude: &[String]) -> Vec<String> {
    exclude
        .iter()
        .map(|name| format!("--exclude={name}"))
        .collect()
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
            arch: chunk[0].rsplit_once('.').map(|(_, arch)| arch.to_string()),
            security: false,
            critical: false,
            bugfix: false,
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

/// Parses `updateinfo list --bugfix` into the packages bug-fix advisories update:
/// lines of advisory id, the type `bugfix`, package.
pub fn parse_bugfix_advisories(output: &str) -> std::collections::BTreeSet<String> {
    output
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 3 && fields[1].eq_ignore_ascii_case("bugfix"))
        .map(|fields| nevra_name(fields[fields.len() - 1]).to_string())
        .collect()
}

/// Whether `updateinfo list` printed any advisory: lines of advisory id, type, package.
pub fn lists_advisories(output: &str) -> bool {
    output
        .lines()
        .any(|line| line.split_whitespace().count() >= 3)
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

/// What `needs-restarting -r` answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartAnswer {
    Required,
    NotRequired,
    /// It did not answer (missing, unknown command, another error): the first line it printed.
    Unknown(String),
}

/// Reads `needs-restarting -r`: exit 1 with "Reboot is required", exit 0 with "Reboot
/// should not be necessary". Anything else (dnf's "No such command: needs-restarting"
/// without dnf-plugins-core is exit 1 too) is no answer.
pub fn parse_needs_restarting(end: &ProcessEnd, output: &str) -> RestartAnswer {
    match end {
        ProcessEnd::Exited(1) if output.contains("Reboot is required") => RestartAnswer::Required,
        ProcessEnd::Exited(0) => RestartAnswer::NotRequired,
        _ => RestartAnswer::Unknown(
            output
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("no output")
                .to_string(),
        ),
    }
}

impl Dnf {
    async fn needs_restarting(&self, timeout: Duration) -> RestartAnswer {
        let spec = match self.flavour {
            Flavour::Dnf => {
                self.commands
                    .spec("dnf", &["-q", "needs-restarting", "-r"], &[], timeout)
            }
            Flavour::Yum => self
                .commands
                .spec("needs-restarting", &["-r"], &[], timeout),
        };
        match crate::agent::process::run(&spec).await {
            Ok(outcome) => parse_needs_restarting(&outcome.end, &outcome.output_tail),
            Err(err) => RestartAnswer::Unknown(err.to_string()),
        }
    }

    /// Whether a reboot is needed, and a note when that is the agent's guess.
    fn reboot(answer: RestartAnswer, installed: &[String]) -> (bool, Option<String>) {
        match answer {
            RestartAnswer::Required => (true, None),
            RestartAnswer::NotRequired => (false, None),
            RestartAnswer::Unknown(why) => {
                let core: Vec<&String> = installed
                    .iter()
                    .filter(|name| REBOOT_PACKAGES.contains(&name.as_str()))
                    .collect();
                let note = format!(
                    "needs-restarting gave no answer ({why}; on dnf it comes with dnf-plugins-core)"
                );
                if core.is_empty() {
                    (false, Some(format!("{note}: no reboot assumed")))
                } else {
                    let core: Vec<&str> = core.iter().map(|s| s.as_str()).collect();
                    (
                        true,
                        Some(format!(
                            "{note}: reboot assumed, {} was updated",
                            core.join(", ")
                        )),
                    )
                }
            }
        }
    }
}

impl Dnf {
    /// The updates available, marked Security/Critical and Bugfix from the advisories
    /// when the selection asks for those classes.
    async fn candidates(
        &self,
        selection: &PatchSelection,
        timeout: Duration,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Update>, PatchError> {
        let program = self.program();
        let mut list_args = vec!["-q".to_string()];
        list_args.extend(exclusions(&selection.exclude));
        list_args.push("check-update".into());
        let list_args: Vec<&str> = list_args.iter().map(String::as_str).collect();
        let listed = run(
            &self.commands.spec(program, &list_args, &[], timeout),
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
            self.mark_security(&mut candidates, timeout, notes).await?;
        }
        if selection
            .classifications
            .contains(&PatchClassification::Bugfix)
        {
            let info = self.query(&self.bugfix_advisories_args(), timeout).await?;
            let fixes = parse_bugfix_advisories(&info);
            for update in &mut candidates {
                update.bugfix = fixes.contains(&update.name);
            }
        }
        Ok(candidates)
    }

    /// Marks the updates that security advisories name, with a warning when the
    /// repositories publish no advisories at all.
    async fn mark_security(
        &self,
        candidates: &mut [Update],
        timeout: Duration,
        notes: &mut Vec<String>,
    ) -> Result<(), PatchError> {
        let advisories = parse_updateinfo(&self.query(&self.updateinfo_args(), timeout).await?);
        if advisories.is_empty() && !candidates.is_empty() {
            let all = self.query(&self.all_advisories_args(), timeout).await?;
            if !lists_advisories(&all) {
                notes.push(format!(
                    "warning: the repositories publish no advisories (updateinfo), so Security and Critical select none of the {} available update(s); name them in include or select All",
                    candidates.len()
                ));
            }
        }
        for update in candidates {
            if let Some(critical) = advisories.get(&update.name) {
                update.security = true;
                update.critical = *critical;
            }
        }
        Ok(())
    }

    /// The standard output of a query that must exit 0.
    async fn query(&self, args: &[&str], timeout: Duration) -> Result<String, PatchError> {
        let spec = self.commands.spec(self.program(), args, &[], timeout);
        Ok(run(&spec, &[0]).await?.stdout)
    }

    /// Upgrades the wanted updates and reads back what got installed.
    async fn upgrade(
        &self,
        wanted: &[Update],
        selection: &PatchSelection,
        timeout: Duration,
        notes: &mut Vec<String>,
    ) -> Result<PatchResults, PatchError> {
        let program = self.program();
        let names: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
        let upgrade = self.upgrade_args(&names, &selection.exclude);
        let upgrade: Vec<&str> = upgrade.iter().map(String::as_str).collect();
        run(&self.commands.spec(program, &upgrade, &[], timeout), &[0]).await?;
        let mut query = vec!["-q", "--qf", RPM_QUERY_FORMAT];
        query.extend(names.iter().map(String::as_str));
        let installed = run(&self.commands.spec("rpm", &query, &[], timeout), &[0, 1]).await?;
        let installed = parse_rpm_query(&installed.stdout);
        let mut results = results(program, wanted, &installed, false, selection.fail_when);
        let upgraded: Vec<String> = results.installed.iter().map(|p| p.name.clone()).collect();
        let (reboot, note) = Self::reboot(self.needs_restarting(timeout).await, &upgraded);
        results.reboot_required = reboot;
        notes.extend(note);
        blame_exclusions(&mut results, &selection.exclude);
        results.message = summary(&results);
        Ok(results)
    }
}

/// A package that was not upgraded while the plan excludes some may have needed one
/// of them: its message says so.
fn blame_exclusions(results: &mut PatchResults, exclude: &[String]) {
    if exclude.is_empty() {
        return;
    }
    for failed in &mut results.failed {
        failed.message = Some(format!(
            "{}: its new version may need a package the plan excludes ({}), which is never installed",
            failed.message.as_deref().unwrap_or("not upgraded"),
            exclude.join(", ")
        ));
    }
}

fn with_notes(mut results: PatchResults, notes: &[String]) -> PatchResults {
    for note in notes {
        results.message = format!("{}; {note}", results.message);
    }
    results
}

impl Patcher for Dnf {
    fn name(&self) -> &'static str {
        self.program()
    }

    fn apply<'a>(&'a self, selection: &'a PatchSelection, timeout: Duration) -> Applying<'a> {
        Box::pin(async move {
            let mut notes = Vec::new();
            let candidates = self.candidates(selection, timeout, &mut notes).await?;
            let wanted = select(candidates, selection);
            let results = if wanted.is_empty() {
                let (reboot, note) = Self::reboot(self.needs_restarting(timeout).await, &[]);
                notes.extend(note);
                results(
                    self.program(),
                    &[],
                    &Default::default(),
                    reboot,
                    selection.fail_when,
                )
            } else {
                self.upgrade(&wanted, selection, timeout, &mut notes)
                    .await?
            };
            Ok(with_notes(results, &notes))
        })
    }
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
    fn bugfix_advisories_select_only_their_packages() {
        assert_eq!(
            parse_bugfix_advisories(UPDATEINFO)
                .into_iter()
                .collect::<Vec<_>>(),
            ["NetworkManager"],
            "security advisories are not bug fixes"
        );
        let mut updates = parse_check_update(CHECK_UPDATE);
        let fixes = parse_bugfix_advisories(UPDATEINFO);
        for update in &mut updates {
            update.bugfix = fixes.contains(&update.name);
        }
        let bugfix = PatchSelection {
            classifications: vec![PatchClassification::Bugfix],
            ..PatchSelection::default()
        };
        let chosen: Vec<String> = select(updates, &bugfix)
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(
            chosen,
            ["NetworkManager"],
            "Bugfix never widens to every update"
        );
        let dnf = Dnf::new(Flavour::Dnf);
        assert_eq!(
            dnf.bugfix_advisories_args(),
            ["-q", "updateinfo", "list", "--bugfix", "--available"]
        );
        assert_eq!(
            Dnf::new(Flavour::Yum).bugfix_advisories_args(),
            ["-q", "updateinfo", "list", "bugfix", "available"]
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
            Dnf::new(Flavour::Dnf).upgrade_args(&["openssl".into()], &["openssl-libs".into()]),
            [
                "-y",
                "--exclude=openssl-libs",
                "--skip-broken",
                "--setopt=best=False",
                "upgrade",
                "openssl"
            ]
        );
        assert_eq!(
            Dnf::new(Flavour::Yum).upgrade_args(&["kernel".into()], &[]),
            ["-y", "--skip-broken", "update", "kernel"]
        );
        assert_eq!(
            Dnf::new(Flavour::Yum).updateinfo_args(),
            ["-q", "updateinfo", "list", "security", "available"]
        );
    }

    #[test]
    fn needs_restarting_answers_only_with_its_own_words() {
        assert_eq!(
            parse_needs_restarting(
                &ProcessEnd::Exited(1),
                "Core libraries or services have been updated since boot-up:\n  * kernel\n\nReboot is required to fully utilize these updates.\n"
            ),
            RestartAnswer::Required
        );
        assert_eq!(
            parse_needs_restarting(
                &ProcessEnd::Exited(0),
                "No core libraries or services have been updated since boot-up.\nReboot should not be necessary.\n"
            ),
            RestartAnswer::NotRequired
        );
        assert_eq!(
            parse_needs_restarting(
                &ProcessEnd::Exited(1),
                "No such command: needs-restarting. Please use /usr/bin/dnf --help\n"
            ),
            RestartAnswer::Unknown(
                "No such command: needs-restarting. Please use /usr/bin/dnf --help".into()
            )
        );
        let (reboot, note) =
            Dnf::reboot(RestartAnswer::Unknown("x".into()), &["kernel-core".into()]);
        assert!(reboot);
        assert!(note.unwrap().contains("kernel-core was updated"));
        let (reboot, _) = Dnf::reboot(RestartAnswer::Unknown("x".into()), &["vim".into()]);
        assert!(!reboot);
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
