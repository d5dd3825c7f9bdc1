//! apt (Debian, Ubuntu): `apt-get update`, a simulated upgrade that may install new
//! packages (so a kernel whose new version depends on a new ABI package is not kept
//! back) to find candidates and their origin (a `-security` suite marks security fixes),
//! a simulated install of the chosen ones to hold back what would change an excluded
//! package, `apt-get install --only-upgrade` (keeping apt's "automatically installed"
//! marks), then `dpkg-query` to see what is really installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use regex::Regex;

use crate::api::patchjob::PatchResults;
use crate::api::plan::PatchSelection;

use super::{
    Applying, Commands, PatchError, Patcher, Update, add_failures, hold_back_for_exclusions,
    is_excluded, results, run, select,
};

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
            reboot_marker: reboot_marker(crate::agent::process::host_root().as_deref()),
            commands: Commands::default(),
        }
    }
}

/// Where the host says it needs a reboot (`update-notifier-common`, `unattended-upgrades`
/// and kernel packages write it), under `root` when the agent sees the host's file
/// system there (a node agent: `/proc/1/root`). `/run`, not `/var/run`: that is a
/// symbolic link to `/run`, and an absolute link under `/proc/1/root` would lead back
/// into the agent's own container.
pub fn reboot_marker(root: Option<&Path>) -> PathBuf {
    root.unwrap_or(Path::new("/")).join("run/reboot-required")
}

const NONINTERACTIVE: &[(&str, &str)] = &[
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("APT_LISTCHANGES_FRONTEND", "none"),
    // needrestart's apt hook would restart services using upgraded libraries, the
    // agent's own included, mid-run: suspended, and list-only if run anyway. Restarts
    // are the reboot policy's business.
    ("NEEDRESTART_SUSPEND", "1"),
    ("NEEDRESTART_MODE", "l"),
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

    /// The option that makes apt wait for the dpkg lock (held by unattended-upgrades, a
    /// person's apt run, ...) instead of failing at once.
    pub fn lock_wait(timeout: Duration) -> String {
        format!("DPkg::Lock::Timeout={}", timeout.as_secs())
    }

    /// `apt-get update`, again while another apt run holds the package lists' lock
    /// (apt-daily's update, unattended-upgrades, a person's `apt update`), until
    /// `timeout`: `DPkg::Lock::Timeout` covers dpkg's lock only, and `update` gives up at
    /// once on this one.
    async fn update_lists(&self, timeout: Duration) -> Result<(), PatchError> {
        let deadline = Instant::now() + timeout;
        let lock_wait = Self::lock_wait(timeout);
        let args = self.args(&["-o", &lock_wait, "-q", "update"]);
        let mut pause = Duration::from_millis(250);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let spec = self.commands.spec("apt-get", &args, NONINTERACTIVE, left);
            match run(&spec, &[0]).await {
                Ok(_) => return Ok(()),
                Err(PatchError::Command { message, .. })
                    if lists_lock_busy(&message) && Instant::now() + pause < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Which of `packages` apt marks as automatically installed (dependencies that
    /// `apt autoremove` may remove once nothing needs them). `apt-get install` marks what
    /// it is given as manually installed, also when it only upgrades it; these marks are
    /// put back afterwards. If apt-mark fails, a note says so and nothing is put back.
    async fn automatic(
        &self,
        packages: &[String],
        timeout: Duration,
        notes: &mut Vec<String>,
    ) -> Vec<String> {
        let mut args = self.args(&["showauto"]);
        args.extend(packages.iter().map(String::as_str));
        match run(&self.commands.spec("apt-mark", &args, &[], timeout), &[0]).await {
            Ok(outcome) => outcome
                .stdout
                .split_whitespace()
                .map(String::from)
                .collect(),
            Err(err) => {
                notes.push(format!(
                    "warning: cannot read which packages are automatically installed, so the upgraded ones are now marked manually installed ({err})"
                ));
                Vec::new()
            }
        }
    }

    /// Marks `packages` as automatically installed again (see [`Apt::automatic`]).
    async fn mark_automatic(
        &self,
        packages: &[String],
        timeout: Duration,
        notes: &mut Vec<String>,
    ) {
        if packages.is_empty() {
            return;
        }
        let lock_wait = Self::lock_wait(timeout);
        let mut args = self.args(&["-o", &lock_wait, "auto"]);
        args.extend(packages.iter().map(String::as_str));
        if let Err(err) = run(&self.commands.spec("apt-mark", &args, &[], timeout), &[0]).await {
            notes.push(format!(
                "warning: {} stay marked manually installed after the upgrade ({err})",
                packages.join(", ")
            ));
        }
    }

    /// Arguments of the simulated upgrade that finds the candidates: new packages may be
    /// installed (`--with-new-pkgs`), nothing removed.
    pub fn simulation_args(&self) -> Vec<&str> {
        self.args(&["-s", "--with-new-pkgs", "upgrade"])
    }

    /// Arguments of the install step for `packages`.
    pub fn install_args(&self, packages: &[String], timeout: Duration) -> Vec<String> {
        let mut args: Vec<String> = self
            .args(&[
                "-y",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "Dpkg::Options::=--force-confold",
            ])
            .into_iter()
            .map(String::from)
            .collect();
        args.extend([
            "-o".to_string(),
            Self::lock_wait(timeout),
            "install".into(),
            "--only-upgrade".into(),
        ]);
        args.extend(packages.iter().cloned());
        args
    }

    /// The packages installing `packages` would upgrade, install or remove.
    async fn simulate_install(
        &self,
        packages: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<String>, PatchError> {
        let mut args = self.args(&["-s", "install", "--only-upgrade"]);
        args.extend(packages.iter().map(String::as_str));
        let simulation = run(
            &self
                .commands
                .spec("apt-get", &args, NONINTERACTIVE, timeout),
            &[0],
        )
        .await?;
        Ok(parse_changes(&simulation.stdout))
    }
}

/// Whether `apt-get update` failed because another process holds the lists' lock
/// (`E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1234`).
pub fn lists_lock_busy(output: &str) -> bool {
    output.lines().any(|line| {
        line.starts_with("E: Could not get lock ") && line.contains("/lists/lock")
            || line.starts_with("E: Unable to lock directory ") && line.contains("/lists/")
    })
}

fn inst_line() -> &'static Regex {
    static LINE: OnceLock<Regex> = OnceLock::new();
    LINE.get_or_init(|| {
        Regex::new(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+) ([^\[\)]*?)(?: \[([^\]]*)\])?\)")
            .expect("valid regex")
    })
}

/// Parses `apt-get -s upgrade` output: one `Inst` line per package to upgrade (with its
/// installed version in brackets) or to install (without).
pub fn parse_simulation(output: &str) -> Vec<Update> {
    output
        .lines()
        .filter_map(|l| inst_line().captures(l))
        .map(|c| {
            let origin = c.get(4).map_or("", |m| m.as_str());
            let security = origin
                .split([',', ' '])
                .any(|suite| suite.contains("-security") || suite.starts_with("Debian-Security"));
            Update {
                name: c[1].to_string(),
                current_version: c.get(2).map(|m| m.as_str().to_string()),
                new_version: c[3].to_string(),
                arch: c.get(5).map(|m| m.as_str().to_string()),
                security,
                // apt records no severity and no bug-fix mark: Critical and Bugfix are
                // refused on apt (`classification_refusal`), never widened.
                critical: false,
                bugfix: false,
            }
        })
        .collect()
}

/// The packages `apt-get -s --with-new-pkgs upgrade` keeps back: those whose new version
/// would remove an installed package (a conflict, a replaced dependency) or that are
/// held (`apt-mark hold`). A patch run removes nothing, so they stay; the result names
/// them instead of leaving them out without a word.
pub fn parse_kept_back(output: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_block = false;
    for line in output.lines() {
        if line.starts_with("The following packages have been kept back:") {
            in_block = true;
        } else if in_block && line.starts_with(' ') {
            names.extend(line.split_whitespace().map(String::from));
        } else {
            in_block = false;
        }
    }
    names
}

/// The packages an `apt-get -s` run would change: its `Inst` and `Remv` lines.
pub fn parse_changes(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Inst ")
                .or_else(|| line.strip_prefix("Remv "))
                .and_then(|rest| rest.split_whitespace().next())
                .map(String::from)
        })
        .collect()
}

/// The `dpkg-query -W` format [`parse_installed`] reads.
pub const DPKG_QUERY_FORMAT: &str = "-f=${Package}\\t${Architecture}\\t${Version}\\t${Status}\\n";

/// Parses `dpkg-query -W` output in [`DPKG_QUERY_FORMAT`]: installed versions keyed by
/// `package:architecture` (`libc6:i386` and `libc6:amd64` are different packages; apt
/// names the native one plain `libc6`).
pub fn parse_installed(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (package, arch, version, status) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            (status.split_whitespace().last() == Some("installed") && !version.is_empty())
                .then(|| (format!("{package}:{arch}"), version.to_string()))
        })
        .collect()
}

/// The installed version of each of `wanted`, under the name apt gave it.
pub fn installed_versions(
    wanted: &[Update],
    installed: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    wanted
        .iter()
        .filter_map(|update| {
            let version = if update.name.contains(':') {
                installed.get(&update.name)
            } else if let Some(arch) = &update.arch {
                installed.get(&format!("{}:{arch}", update.name))
            } else {
                let prefix = format!("{}:", update.name);
                installed
                    .iter()
                    .find(|(key, _)| key.starts_with(&prefix))
                    .map(|(_, version)| version)
            };
            version.map(|v| (update.name.clone(), v.clone()))
        })
        .collect()
}

/// `results` with a note naming the packages apt kept back, if any.
fn with_kept_back(mut results: PatchResults, kept_back: &[String]) -> PatchResults {
    if !kept_back.is_empty() {
        results.message = format!(
            "{}; kept back by apt (the new version would remove an installed package, or the package is held), not installed: {}",
            results.message,
            kept_back.join(", ")
        );
    }
    results
}

impl Patcher for Apt {
    fn name(&self) -> &'static str {
        "apt"
    }

    fn apply<'a>(&'a self, selection: &'a PatchSelection, timeout: Duration) -> Applying<'a> {
        Box::pin(async move {
            self.update_lists(timeout).await?;
            let simulation = run(
                &self
                    .commands
                    .spec("apt-get", &self.simulation_args(), NONINTERACTIVE, timeout),
                &[0],
            )
            .await?;
            // Upgrades only: packages new to the host come along as dependencies.
            let candidates = parse_simulation(&simulation.stdout)
                .into_iter()
                .filter(|u| u.current_version.is_some())
                .collect();
            let kept_back: Vec<String> = parse_kept_back(&simulation.stdout)
                .into_iter()
                .filter(|name| !is_excluded(&selection.exclude, name))
                .collect();
            let (wanted, held_back) = hold_back_for_exclusions(
                select(candidates, selection),
                &selection.exclude,
                |packages| self.simulate_install(packages, timeout),
            )
            .await?;
            let reboot_required = || self.reboot_marker.exists();
            if wanted.is_empty() {
                let mut results = results(
                    self.name(),
                    &[],
                    &Default::default(),
                    reboot_required(),
                    selection.fail_when,
                );
                add_failures(&mut results, held_back, selection.fail_when);
                return Ok(with_kept_back(results, &kept_back));
            }
            let names: Vec<String> = wanted.iter().map(|u| u.name.clone()).collect();
            let mut notes = Vec::new();
            let automatic = self.automatic(&names, timeout, &mut notes).await;
            let install_args = self.install_args(&names, timeout);
            let install_args: Vec<&str> = install_args.iter().map(String::as_str).collect();
            let install = run(
                &self
                    .commands
                    .spec("apt-get", &install_args, NONINTERACTIVE, timeout),
                &[0, 100],
            )
            .await?;
            self.mark_automatic(&automatic, timeout, &mut notes).await;
            let mut query_args = vec!["-W", DPKG_QUERY_FORMAT];
            query_args.extend(names.iter().map(String::as_str));
            let installed = run(
                &self.commands.spec("dpkg-query", &query_args, &[], timeout),
                &[0, 1],
            )
            .await?;
            let mut results = results(
                self.name(),
                &wanted,
                &installed_versions(&wanted, &parse_installed(&installed.stdout)),
                reboot_required(),
                selection.fail_when,
            );
            if !results.failed.is_empty() {
                results.message = format!("{}\n{}", results.message, install.output_tail);
            }
            add_failures(&mut results, held_back, selection.fail_when);
            for note in notes {
                results.message = format!("{}; {note}", results.message);
            }
            Ok(with_kept_back(results, &kept_back))
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
    fn bugfix_and_critical_never_widen_to_other_updates_on_apt() {
        use crate::api::plan::PatchClassification;
        for classification in [PatchClassification::Bugfix, PatchClassification::Critical] {
            let selection = PatchSelection {
                classifications: vec![classification],
                ..PatchSelection::default()
            };
            let chosen = select(parse_simulation(SIMULATION), &selection);
            assert!(chosen.is_empty(), "{classification:?}: {chosen:?}");
            assert!(selection.refusal_on("apt").is_some(), "{classification:?}");
        }
        let security = select(parse_simulation(SIMULATION), &PatchSelection::default());
        let names: Vec<&str> = security.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["libssl3", "openssl"]);
    }

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
    fn install_is_noninteractive_upgrade_only_and_waits_for_the_lock() {
        let apt = Apt {
            options: vec!["Dir::Etc::SourceList=/tmp/s.list".into()],
            ..Apt::default()
        };
        let args = apt.install_args(&["openssl".into()], Duration::from_secs(600));
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
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "--only-upgrade",
                "openssl"
            ]
        );
        assert_eq!(
            apt.simulation_args(),
            [
                "-o",
                "Dir::Etc::SourceList=/tmp/s.list",
                "-s",
                "--with-new-pkgs",
                "upgrade"
            ]
        );
    }

    #[test]
    fn installed_versions_keep_the_architecture() {
        let rows = parse_installed(
            "openssl\tamd64\t3.0.13-1~deb12u1\tinstall ok installed\n\
             libc6\tamd64\t2.36-9+deb12u7\tinstall ok installed\n\
             libc6\ti386\t2.36-9+deb12u4\tinstall ok installed\n\
             tzdata\tall\t2024a-0+deb12u1\thold ok installed\n\
             removed\tamd64\t1.0\tdeinstall ok config-files\n\
             never\tamd64\t\tunknown ok not-installed\n",
        );
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert_eq!(rows["libc6:i386"], "2.36-9+deb12u4");
        let wanted = parse_simulation(
            "Inst libc6 [2.36-9+deb12u4] (2.36-9+deb12u7 Debian-Security:12/stable-security [amd64])\n\
             Inst libc6:i386 [2.36-9+deb12u4] (2.36-9+deb12u7 Debian-Security:12/stable-security [i386])\n\
             Inst tzdata [2024a-0+deb12u0] (2024a-0+deb12u1 Debian:12.6/stable [all])\n",
        );
        let versions = installed_versions(&wanted, &rows);
        assert_eq!(versions["libc6"], "2.36-9+deb12u7");
        assert_eq!(
            versions["libc6:i386"], "2.36-9+deb12u4",
            "the i386 one did not upgrade"
        );
        assert_eq!(versions["tzdata"], "2024a-0+deb12u1");
        assert!(DPKG_QUERY_FORMAT.contains("${Architecture}"));
    }

    #[test]
    fn simulated_changes_include_new_and_removed_packages() {
        assert_eq!(
            parse_changes(
                "Inst linux-image-6.1.0-99-amd64 (6.1.99-1 Debian-Security:12/stable-security [amd64])\n\
                 Inst linux-image-amd64 [6.1.90-1] (6.1.99-1 Debian-Security:12/stable-security [amd64])\n\
                 Remv old-thing [1.0]\n\
                 Conf linux-image-amd64 (6.1.99-1 Debian-Security:12/stable-security [amd64])\n"
            ),
            [
                "linux-image-6.1.0-99-amd64",
                "linux-image-amd64",
                "old-thing"
            ]
        );
    }

    #[test]
    fn a_busy_lists_lock_is_recognised() {
        assert!(lists_lock_busy(
            "Reading package lists...\nE: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)\nE: Unable to lock directory /var/lib/apt/lists/\n"
        ));
        assert!(!lists_lock_busy(
            "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (apt)\n"
        ));
        assert!(!lists_lock_busy(
            "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease\n"
        ));
    }

    #[test]
    fn kept_back_packages_are_named() {
        let output = "\
Calculating upgrade...
The following packages have been kept back:
  libfoo-dev linux-image-amd64
  zfs-dkms
The following packages will be upgraded:
  openssl
1 upgraded, 0 newly installed, 0 to remove and 3 not upgraded.
Inst openssl [3.0.11-1~deb12u2] (3.0.13-1~deb12u1 Debian-Security:12/stable-security [amd64])
";
        assert_eq!(
            parse_kept_back(output),
            ["libfoo-dev", "linux-image-amd64", "zfs-dkms"]
        );
        assert!(parse_kept_back(SIMULATION).is_empty());
        let results = with_kept_back(
            results("apt", &[], &Default::default(), false, Default::default()),
            &parse_kept_back(output),
        );
        assert_eq!(
            results.message,
            "no updates selected; kept back by apt (the new version would remove an installed package, or the package is held), not installed: libfoo-dev, linux-image-amd64, zfs-dkms"
        );
    }

    #[test]
    fn the_reboot_marker_is_on_the_host() {
        assert_eq!(reboot_marker(None), PathBuf::from("/run/reboot-required"));
        assert_eq!(
            reboot_marker(Some(Path::new("/proc/1/root"))),
            PathBuf::from("/proc/1/root/run/reboot-required")
        );
    }
}
