//! The dnf and zypper patchers against fake package managers: small shell scripts in a
//! temporary directory that the patcher finds first on its `PATH`. They keep the
//! "installed" and "available" versions in files there, log every call, and behave like
//! the real tools where it matters: zypper exits 103 after updating itself and 106/107
//! with warnings, refuses to run while "locked" unless told to wait, and wants licenses
//! agreed; dnf answers "No such command" for needs-restarting without dnf-plugins-core,
//! and yum finds no needs-restarting program without yum-utils;
//! both print translated output unless `LC_ALL=C`. Nothing outside the temporary
//! directory is touched.

use std::path::PathBuf;
use std::time::Duration;

use fleetpatch::agent::patcher::dnf::{Dnf, Flavour};
use fleetpatch::agent::patcher::zypper::Zypper;
use fleetpatch::agent::patcher::{Commands, Patcher};
use fleetpatch::api::patchjob::{ActionPhase, PatchResults};
use fleetpatch::api::plan::{PatchClassification, PatchSelection};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary directory with fake programs in `bin/` and their state in `state/`.
struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    fn new() -> Self {
        let host = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        for sub in ["bin", "state/installed", "state/available", "state/needs"] {
            std::fs::create_dir_all(host.dir.path().join(sub)).unwrap();
        }
        host.program("rpm", RPM);
        host
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Installs a fake `name` running `body` (POSIX sh; `$S` is the state directory).
    fn program(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("bin").join(name);
        let script = format!(
            "#!/bin/sh\nS='{}'\nprintf '%s|LC_ALL=%s|ZYPP_LOCK_TIMEOUT=%s\\n' \"{name} $*\" \"$LC_ALL\" \"$ZYPP_LOCK_TIMEOUT\" >> \"$S/calls\"\n{body}",
            self.state().display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn commands(&self) -> Commands {
        Commands {
            path: Some(format!(
                "{}:/usr/bin:/bin",
                self.dir.path().join("bin").display()
            )),
            ..Commands::default()
        }
    }

    fn installed(&self, package: &str, version: &str) {
        std::fs::write(self.state().join("installed").join(package), version).unwrap();
    }

    fn available(&self, package: &str, version: &str) {
        std::fs::write(self.state().join("available").join(package), version).unwrap();
    }

    /// The new version of `package` needs the new version of `dependency`.
    fn needs(&self, package: &str, dependency: &str) {
        std::fs::write(self.state().join("needs").join(package), dependency).unwrap();
    }

    fn version(&self, package: &str) -> Option<String> {
        std::fs::read_to_string(self.state().join("installed").join(package)).ok()
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.state().join("calls"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.state().join(file), text).unwrap();
    }
}

/// `rpm -q --qf FORMAT name...`: the fake host's installed versions.
const RPM: &str = r#"shift 3
for n in "$@"; do
  if [ -f "$S/installed/$n" ]; then echo "$n $(cat "$S/installed/$n")"; else echo "package $n is not installed"; fi
done
"#;

/// Upgrades the packages named in "$@" (options skipped) unless excluded; a package
/// whose new version needs an excluded one is skipped, as dnf --skip-broken does.
const UPGRADE_NAMED: &str = r#"
excluded=""
for a in "$@"; do case "$a" in --exclude=*) excluded="$excluded ${a#--exclude=}";; esac; done
is_excluded() { for e in $excluded; do [ "$e" = "$1" ] && return 0; done; return 1; }
upgrade() {
  for a in "$@"; do
    case "$a" in -*|upgrade|update|patch) continue;; esac
    is_excluded "$a" && continue
    dep=$(cat "$S/needs/$a" 2>/dev/null)
    if [ -n "$dep" ] && is_excluded "$dep"; then echo "Skipping packages with broken dependencies: $a"; continue; fi
    for p in $a $dep; do cp "$S/available/$p" "$S/installed/$p"; done
  done
}
"#;

const DNF: &str = r#"
case " $* " in
  *" check-update "*)
    [ "$LC_ALL" = C ] || echo "Letzte Prüfung auf abgelaufene Metadaten: vor 0:00:01 am Do 01 Jan 2026 00:00:00 UTC."
    for f in "$S"/available/*; do
      n=$(basename "$f"); is_excluded "$n" && continue
      [ "$(cat "$S/installed/$n" 2>/dev/null)" = "$(cat "$f")" ] && continue
      echo "$n.x86_64    $(cat "$f")    baseos"
    done
    exit 100 ;;
  *" updateinfo "*)
    # Each advisory type only when asked for, as dnf lists them.
    case " $* " in
      *" --security "*) grep 'Sec\.' "$S/updateinfo" 2>/dev/null ;;
      *" --bugfix "*) grep ' bugfix ' "$S/updateinfo" 2>/dev/null ;;
      *) cat "$S/updateinfo" 2>/dev/null ;;
    esac
    exit 0 ;;
  *" needs-restarting "*)
    if [ "$LC_ALL" = C ]; then echo "No such command: needs-restarting. Please use /usr/bin/dnf --help" >&2
    else echo "Kein solcher Befehl: needs-restarting. Bitte /usr/bin/dnf --help verwenden" >&2; fi
    exit 1 ;;
  *" upgrade "*|*" update "*) upgrade "$@"; exit 0 ;;
esac
echo "unexpected: $*" >&2; exit 2
"#;

fn dnf_host() -> (FakeHost, Dnf) {
    let host = FakeHost::new();
    host.program("dnf", &format!("{UPGRADE_NAMED}{DNF}"));
    let dnf = Dnf {
        commands: host.commands(),
        ..Dnf::new(Flavour::Dnf)
    };
    (host, dnf)
}

fn all() -> PatchSelection {
    PatchSelection {
        classifications: vec![PatchClassification::All],
        ..PatchSelection::default()
    }
}

fn names(results: &PatchResults) -> Vec<&str> {
    results.installed.iter().map(|p| p.name.as_str()).collect()
}

/// Every call the patcher made ran with untranslated output.
fn all_untranslated(host: &FakeHost) {
    let calls = host.calls();
    assert!(!calls.is_empty());
    for call in calls {
        assert!(call.contains("|LC_ALL=C|"), "{call}");
    }
}

#[tokio::test]
async fn dnf_without_needs_restarting_does_not_claim_a_reboot() {
    let (host, dnf) = dnf_host();
    host.installed("vim-enhanced", "2:9.0.2081-1.el9");
    host.available("vim-enhanced", "2:9.0.2120-1.el9");
    let results = dnf.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(names(&results), ["vim-enhanced"], "{results:?}");
    assert!(!results.reboot_required, "{results:?}");
    assert!(
        results.message.contains("dnf-plugins-core")
            && results.message.contains("no reboot assumed"),
        "{}",
        results.message
    );
    all_untranslated(&host);

    // A kernel update still asks for one, on the agent's own account.
    host.installed("kernel-core", "5.14.0-427.el9");
    host.available("kernel-core", "5.14.0-503.el9");
    let results = dnf.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(names(&results), ["kernel-core"], "{results:?}");
    assert!(results.reboot_required, "{results:?}");
    assert!(
        results.message.contains("kernel-core was updated"),
        "{}",
        results.message
    );
}

/// yum has needs-restarting as a program of its own (yum-utils); without it the patcher
/// says so and assumes a reboot only after a kernel update, as with dnf.
#[tokio::test]
async fn yum_without_needs_restarting_does_not_claim_a_reboot() {
    let host = FakeHost::new();
    host.program("yum", &format!("{UPGRADE_NAMED}{DNF}"));
    let path = host.commands().path.unwrap();
    assert!(
        std::env::split_paths(&path).all(|dir| !dir.join("needs-restarting").exists()),
        "needs-restarting must be missing from {path}"
    );
    let yum = Dnf {
        commands: host.commands(),
        ..Dnf::new(Flavour::Yum)
    };
    host.installed("vim-enhanced", "2:8.0.1763-19.el7");
    host.available("vim-enhanced", "2:8.0.1763-20.el7");
    let results = yum.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(names(&results), ["vim-enhanced"], "{results:?}");
    assert!(!results.reboot_required, "{results:?}");
    assert!(
        results.message.contains("no reboot assumed"),
        "{}",
        results.message
    );
    host.installed("kernel", "3.10.0-1160.105.1.el7");
    host.available("kernel", "3.10.0-1160.108.1.el7");
    let results = yum.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(names(&results), ["kernel"], "{results:?}");
    assert!(results.reboot_required, "{results:?}");
    all_untranslated(&host);
}

#[tokio::test]
async fn dnf_warns_when_the_repositories_publish_no_advisories() {
    let (host, dnf) = dnf_host();
    host.installed("openssl-libs", "1:3.0.7-25.el9");
    host.available("openssl-libs", "1:3.0.7-27.el9");
    host.write("updateinfo", "");
    let results = dnf
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert!(results.installed.is_empty(), "{results:?}");
    assert_eq!(results.phase, ActionPhase::Succeeded);
    assert!(
        results.message.contains("publish no advisories"),
        "{}",
        results.message
    );

    // With advisories, the security update is found and no warning is given.
    host.write(
        "updateinfo",
        "RLSA-2024:3501 Important/Sec. openssl-libs-1:3.0.7-27.el9.x86_64\n",
    );
    let results = dnf
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(names(&results), ["openssl-libs"], "{results:?}");
    assert!(
        !results.message.contains("advisories"),
        "{}",
        results.message
    );
}

#[tokio::test]
async fn dnf_never_upgrades_an_excluded_dependency() {
    let (host, dnf) = dnf_host();
    for (package, old, new) in [
        ("openssl", "1:3.0.7-25.el9", "1:3.0.7-27.el9"),
        ("openssl-libs", "1:3.0.7-25.el9", "1:3.0.7-27.el9"),
        ("curl", "7.76.1-29.el9", "7.76.1-31.el9"),
    ] {
        host.installed(package, old);
        host.available(package, new);
    }
    host.needs("openssl", "openssl-libs");
    let selection = PatchSelection {
        exclude: vec!["openssl-libs".into()],
        ..all()
    };
    let results = dnf.apply(&selection, TIMEOUT).await.unwrap();
    assert_eq!(
        host.version("openssl-libs").as_deref(),
        Some("1:3.0.7-25.el9")
    );
    assert_eq!(host.version("openssl").as_deref(), Some("1:3.0.7-25.el9"));
    assert_eq!(names(&results), ["curl"], "{results:?}");
    assert_eq!(results.failed.len(), 1, "{results:?}");
    assert_eq!(results.failed[0].name, "openssl");
    let message = results.failed[0].message.as_deref().unwrap();
    assert!(
        message.contains("wanted 1:3.0.7-27.el9, found 1:3.0.7-25.el9")
            && message.contains("excludes (openssl-libs)"),
        "{message}"
    );
    let upgrade = host
        .calls()
        .into_iter()
        .find(|c| c.contains(" upgrade "))
        .unwrap();
    assert!(upgrade.contains("--exclude=openssl-libs"), "{upgrade}");
}

/// Bugfix is dnf's bugfix advisories: their packages only, never the security fixes
/// or the updates no advisory names.
#[tokio::test]
async fn dnf_bugfix_installs_only_what_bugfix_advisories_name() {
    let (host, dnf) = dnf_host();
    for (name, old, new) in [
        ("NetworkManager", "1:1.46.0-7.el9", "1:1.46.0-8.el9"),
        ("kernel", "5.14.0-427.20.1.el9", "5.14.0-427.22.1.el9"),
        ("vim-enhanced", "2:8.2.2637-20.el9", "2:8.2.2637-21.el9"),
    ] {
        host.installed(name, old);
        host.available(name, new);
    }
    host.write(
        "updateinfo",
        "RLSA-2024:3339 Important/Sec. kernel-5.14.0-427.22.1.el9.x86_64
         RLBA-2024:3400 bugfix         NetworkManager-1:1.46.0-8.el9.x86_64
",
    );
    let bugfix = PatchSelection {
        classifications: vec![PatchClassification::Bugfix],
        ..PatchSelection::default()
    };
    let results = dnf.apply(&bugfix, TIMEOUT).await.unwrap();
    assert_eq!(names(&results), ["NetworkManager"], "{results:?}");
    assert_eq!(
        host.version("kernel").as_deref(),
        Some("5.14.0-427.20.1.el9")
    );
    assert_eq!(
        host.version("vim-enhanced").as_deref(),
        Some("2:8.2.2637-20.el9")
    );
}

/// Bugfix is zypper's `recommended` patch category: `zypper patch --category
/// recommended`, never an update of every package.
#[tokio::test]
async fn zypper_bugfix_patches_the_recommended_category_only() {
    let (host, zypper) = zypper_host();
    host.installed("vim", "9.1.0111-150500.20.9.1");
    host.available("vim", "9.1.0330-150500.20.12.1");
    let bugfix = PatchSelection {
        classifications: vec![PatchClassification::Bugfix],
        ..PatchSelection::default()
    };
    let results = zypper.apply(&bugfix, TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(
        host.version("vim").as_deref(),
        Some("9.1.0111-150500.20.9.1")
    );
    let calls = host.calls();
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("zypper") && c.contains(" update ")),
        "{calls:?}"
    );
    let patches: Vec<&String> = calls.iter().filter(|c| c.contains(" patch ")).collect();
    assert!(!patches.is_empty(), "{calls:?}");
    for call in patches {
        assert!(call.contains("--category recommended"), "{call}");
        assert!(!call.contains("security"), "{call}");
    }
}

/// Answers zypper's commands from the fake host's files. The first `patch` run updates
/// zypper itself and exits 103, as zypper does when the package manager had patches.
const ZYPPER: &str = r#"
if [ -z "$ZYPP_LOCK_TIMEOUT" ] && [ -f "$S/locked" ]; then
  echo "System management is locked by the application with pid 4242 (zypper)." >&2; exit 7
fi
rm -f "$S/locked"
german() { [ "$LC_ALL" != C ]; }
licenses() { case " $* " in *" --auto-agree-with-licenses "*) ;; *) echo "Aborting: license agreement required" >&2; exit 4;; esac; }
block() { # header, then the packages
  h=$1; shift
  if german; then echo "Die folgenden $# Pakete werden aktualisiert:"; else echo "The following $# packages are $h:"; fi
  echo "  $*"; echo
}
case " $* " in
  *" list-patches "*)
    if german; then echo "Repository | Name | Kategorie | Schweregrad | Interaktiv | Status | Zusammenfassung"
    else echo "Repository | Name | Category | Severity | Interactive | Status | Summary"; fi
    echo "-----------+------+----------+----------+-------------+--------+--------"
    echo "Update 15.5 | openSUSE-SLE-15.5-2024-1 | security | important | --- | needed | Security update for glibc"
    echo "Update 15.5 | openSUSE-SLE-15.5-2024-2 | security | important | --- | needed | Security update for openssl"
    exit 100 ;;
  *" patch "*)
    licenses "$@"
    n=$(cat "$S/patch-runs" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$S/patch-runs"
    if [ $n = 1 ]; then block "going to be upgraded" zypper; exit 103; fi
    block "going to be upgraded" glibc libopenssl3; exit 0 ;;
  *" list-updates "*)
    echo "S | Repository | Name | Current Version | Available Version | Arch"
    echo "--+------------+------+-----------------+-------------------+-------"
    for f in "$S"/available/*; do
      n=$(basename "$f"); [ "$(cat "$S/installed/$n")" = "$(cat "$f")" ] && continue
      echo "v | Update 15.5 | $n | $(cat "$S/installed/$n") | $(cat "$f") | x86_64"
    done
    echo "Warning: Repository 'Backports' appears to be outdated." >&2
    exit 106 ;;
  *" update "*)
    licenses "$@"
    changed=""
    for a in "$@"; do case "$a" in -*|update) continue;; esac; changed="$changed $a $(cat "$S/needs/$a" 2>/dev/null)"; done
    case " $* " in *" --dry-run "*) block "going to be upgraded" $changed; exit 0;; esac
    for p in $changed; do cp "$S/available/$p" "$S/installed/$p"; done
    block "going to be upgraded" $changed
    exit 107 ;;
  *" needs-rebooting "*) [ -f "$S/reboot" ] && exit 102; exit 0 ;;
esac
echo "unexpected: $*" >&2; exit 2
"#;

fn zypper_host() -> (FakeHost, Zypper) {
    let host = FakeHost::new();
    host.program("zypper", ZYPPER);
    let zypper = Zypper {
        commands: host.commands(),
    };
    (host, zypper)
}

#[tokio::test]
async fn zypper_runs_again_after_updating_itself_and_waits_for_its_lock() {
    let (host, zypper) = zypper_host();
    host.write("locked", "");
    host.write("reboot", "");
    let results = zypper
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(
        names(&results),
        ["zypper", "glibc", "libopenssl3"],
        "the second run installs the patches the first left: {results:?}"
    );
    assert!(results.reboot_required, "needs-rebooting said 102");
    assert!(
        results.message.contains("2 security patch(es) were needed"),
        "{}",
        results.message
    );
    let calls = host.calls();
    let patches: Vec<&String> = calls.iter().filter(|c| c.contains(" patch ")).collect();
    assert_eq!(patches.len(), 2, "{calls:?}");
    for call in &calls {
        assert!(call.contains("|ZYPP_LOCK_TIMEOUT=60"), "{call}");
    }
    all_untranslated(&host);
}

#[tokio::test]
async fn zypper_warnings_106_and_107_are_not_failures() {
    let (host, zypper) = zypper_host();
    host.installed("vim", "9.1.0111-150500.20.9.1");
    host.available("vim", "9.1.0330-150500.20.12.1");
    let results = zypper.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(names(&results), ["vim"], "{results:?}");
    assert_eq!(
        results.installed[0].version.as_deref(),
        Some("9.1.0330-150500.20.12.1")
    );
    assert!(!results.reboot_required);
    assert!(
        results.message.contains("exit 106") && results.message.contains("exit 107"),
        "{}",
        results.message
    );
    let update = host
        .calls()
        .into_iter()
        .find(|c| c.starts_with("zypper -n update --auto"))
        .unwrap();
    assert!(update.contains("--auto-agree-with-licenses"), "{update}");
    all_untranslated(&host);
}

#[tokio::test]
async fn zypper_holds_back_an_update_that_needs_an_excluded_package() {
    let (host, zypper) = zypper_host();
    for (package, old, new) in [
        ("vim", "9.1.0111", "9.1.0330"),
        ("vim-data-common", "9.1.0111", "9.1.0330"),
        ("libopenssl3", "3.0.8-150500.5.27.1", "3.0.8-150500.5.30.1"),
    ] {
        host.installed(package, old);
        host.available(package, new);
    }
    host.needs("vim", "vim-data-common");
    let selection = PatchSelection {
        exclude: vec!["vim-data-common".into()],
        ..all()
    };
    let results = zypper.apply(&selection, TIMEOUT).await.unwrap();
    assert_eq!(host.version("vim-data-common").as_deref(), Some("9.1.0111"));
    assert_eq!(host.version("vim").as_deref(), Some("9.1.0111"));
    assert_eq!(names(&results), ["libopenssl3"], "{results:?}");
    assert_eq!(results.failed.len(), 1, "{results:?}");
    assert_eq!(
        results.failed[0].message.as_deref(),
        Some(
            "not installed: vim 9.1.0330 would also change vim-data-common, which the plan excludes"
        )
    );
}

/// `include` names packages installed whatever their classification: with Security,
/// zypper installs the security patches and then the named packages, as apt and dnf do.
#[tokio::test]
async fn zypper_installs_included_packages_besides_the_security_patches() {
    let (host, zypper) = zypper_host();
    host.installed("vim", "9.1.0111-150500.20.9.1");
    host.available("vim", "9.1.0330-150500.20.12.1");
    let selection = PatchSelection {
        include: vec!["vim".into()],
        ..PatchSelection::default()
    };
    let results = zypper.apply(&selection, TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(
        names(&results),
        ["zypper", "glibc", "libopenssl3", "vim"],
        "{results:?}"
    );
    assert_eq!(
        host.version("vim").as_deref(),
        Some("9.1.0330-150500.20.12.1")
    );
    assert!(
        results.message.contains("included: 1 update(s) installed"),
        "{}",
        results.message
    );
    all_untranslated(&host);
}
