//! The dnf patcher against fake package managers: small shell scripts in a temporary
//! directory that the patcher finds first on its `PATH`. They keep the "installed" and
//! "available" versions in files there, log every call, and behave like the real tools
//! where it matters: dnf answers "No such command" for needs-restarting without
//! dnf-plugins-core, and prints translated output unless `LC_ALL=C`. Nothing outside
//! the temporary directory is touched.

use std::path::PathBuf;
use std::time::Duration;

use fleetpatch::agent::patcher::dnf::{Dnf, Flavour};
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
  *" updateinfo "*) cat "$S/updateinfo" 2>/dev/null; exit 0 ;;
  *" needs-restarting "*)
    if [ "$LC_ALL" = C ]; then echo "No such command: needs-restarting. Please use /usr/bin/dnf --help" >&2
    else echo "Kein solcher Befehl: needs-restarting. Bitte /usr/bin/dnf --help verwenden" >&2; fi
    exit 1 ;;
  *" upgrade "*) upgrade "$@"; exit 0 ;;
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
