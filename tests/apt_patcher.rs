//! The apt patcher against real packages: throwaway .debs built with `dpkg-deb`, local
//! repositories made with `dpkg-scanpackages` (with a Release file when the test needs
//! a `-security` suite), and real upgrades through the patcher. apt reads only the
//! test's own sources list and package lists, so the host's configuration is not
//! touched; the packages themselves are installed for real and purged afterwards. The
//! tests run one at a time: they share the host's dpkg database.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetpatch::agent::patcher::Patcher;
use fleetpatch::agent::patcher::apt::Apt;
use fleetpatch::api::patchjob::ActionPhase;
use fleetpatch::api::plan::{PatchClassification, PatchSelection};
use support::prerequisite;

const DEMO: &str = "fleetpatch-test-demo";
const META: &str = "fleetpatch-test-meta";
const ABI: &str = "fleetpatch-test-abi-2";
const APP: &str = "fleetpatch-test-app";
const LIB: &str = "fleetpatch-test-lib";
const OTHER: &str = "fleetpatch-test-other";
const EVERY_PACKAGE: &[&str] = &[DEMO, META, ABI, APP, LIB, OTHER];

/// The tests share the host's dpkg database: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Skips outside CI when the machine cannot run the test; fails in CI.
fn prerequisites() -> bool {
    let missing: Vec<&str> = ["dpkg-deb", "dpkg-scanpackages", "apt-get", "dpkg-query"]
        .into_iter()
        .filter(|p| !prerequisite::on_path(p))
        .collect();
    if !missing.is_empty() {
        prerequisite::missing(&format!(
            "apt patcher tests need {missing:?} (install dpkg-dev; scripts/test-all.sh does)"
        ));
        return false;
    }
    prerequisite::root("the apt patcher tests (they install throwaway packages)")
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Builds `name` `version` (with a `Depends:` line when given) into `out`.
fn build_deb(root: &Path, name: &str, version: &str, depends: Option<&str>, out: &Path) {
    let tree = root.join(format!("tree-{name}-{version}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join(format!("usr/share/{name}"))).unwrap();
    let depends = depends.map_or(String::new(), |d| format!("Depends: {d}\n"));
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\n{depends}Maintainer: fleetpatch tests <tests@fleetpatch.invalid>\nDescription: throwaway package for the apt patcher tests\n"
        ),
    )
    .unwrap();
    std::fs::write(tree.join(format!("usr/share/{name}/VERSION")), version).unwrap();
    run(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            tree.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
}

/// Builds and installs `name` `version` on the host.
fn install(root: &Path, name: &str, version: &str, depends: Option<&str>) {
    let deb = root.join(format!("{name}_{version}_all.deb"));
    build_deb(root, name, version, depends, &deb);
    run("dpkg", &["-i", deb.to_str().unwrap()]);
    assert_eq!(installed_version(name).as_deref(), Some(version));
}

/// A local repository of `packages` (name, version, depends) and an apt patcher that
/// reads only it. With `suite`, the repository has a Release file naming that suite.
fn repository(root: &Path, packages: &[(&str, &str, Option<&str>)], suite: Option<&str>) -> Apt {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for (name, version, depends) in packages {
        build_deb(
            root,
            name,
            version,
            *depends,
            &repo.join(format!("{name}_{version}_all.deb")),
        );
    }
    let scanned = Command::new("dpkg-scanpackages")
        .args(["--multiversion", "."])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(scanned.status.success());
    std::fs::write(repo.join("Packages"), &scanned.stdout).unwrap();
    if let Some(suite) = suite {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(&scanned.stdout));
        std::fs::write(
            repo.join("Release"),
            format!(
                "Origin: fleetpatch-tests\nLabel: fleetpatch-tests\nSuite: {suite}\nCodename: fleetpatch\nDate: Thu, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {digest} {} Packages\n",
                scanned.stdout.len()
            ),
        )
        .unwrap();
    }
    let sources = root.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb [trusted=yes] file:{} ./\n", repo.display()),
    )
    .unwrap();
    let lists = root.join("lists");
    std::fs::create_dir_all(lists.join("partial")).unwrap();
    let archives = root.join("archives");
    std::fs::create_dir_all(archives.join("partial")).unwrap();
    Apt {
        options: vec![
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/nonexistent".into(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache::Archives={}", archives.display()),
            "APT::Sandbox::User=root".into(),
        ],
        reboot_marker: root.join("reboot-required"),
        ..Apt::default()
    }
}

fn installed_version(package: &str) -> Option<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let version = text.strip_prefix("install ok installed ")?;
    (output.status.success() && !version.is_empty()).then(|| version.to_string())
}

/// Purges every throwaway package, before a test (a killed run leaves them) and after.
struct Purge;

impl Purge {
    fn now() -> Self {
        Self.purge();
        Self
    }

    fn purge(&self) {
        let _ = Command::new("dpkg")
            .arg("--purge")
            .args(EVERY_PACKAGE)
            .output();
    }
}

impl Drop for Purge {
    fn drop(&mut self) {
        self.purge();
    }
}

fn all() -> PatchSelection {
    PatchSelection {
        classifications: vec![PatchClassification::All],
        ..PatchSelection::default()
    }
}

const TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn apt_upgrades_a_real_package_from_a_local_repository() {
    if !prerequisites() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let _purge = Purge::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root, DEMO, "1.0", None);
    let apt = repository(root, &[(DEMO, "2.0", None)], None);

    // Security-only selection: the local repository is no security suite, so nothing is installed.
    let results = apt
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded);
    assert!(results.installed.is_empty(), "{results:?}");
    assert_eq!(installed_version(DEMO).as_deref(), Some("1.0"));

    // Excluded: still nothing.
    let excluded = PatchSelection {
        exclude: vec![DEMO.into()],
        ..all()
    };
    let results = apt.apply(&excluded, TIMEOUT).await.unwrap();
    assert!(results.installed.is_empty(), "{results:?}");

    // Everything: 1.0 → 2.0.
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(results.patcher.as_deref(), Some("apt"));
    assert_eq!(results.installed.len(), 1, "{results:?}");
    assert_eq!(results.installed[0].name, DEMO);
    assert_eq!(results.installed[0].version.as_deref(), Some("2.0"));
    assert!(!results.reboot_required);
    assert_eq!(installed_version(DEMO).as_deref(), Some("2.0"));
    assert_eq!(
        std::fs::read_to_string(format!("/usr/share/{DEMO}/VERSION")).unwrap(),
        "2.0"
    );

    // The host says it needs a reboot.
    std::fs::write(&apt.reboot_marker, "*** System restart required ***\n").unwrap();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert!(results.reboot_required, "{results:?}");
}

/// Like `linux-image-amd64`, whose new version depends on a new ABI package
/// (`linux-image-6.1.0-99-amd64`): `apt-get upgrade` keeps it back, so a security
/// patch run never installed kernel fixes.
#[tokio::test]
async fn a_package_whose_new_version_needs_a_new_dependency_is_selected() {
    if !prerequisites() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let _purge = Purge::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root, META, "1.0", None);
    let apt = repository(
        root,
        &[(META, "2.0", Some(ABI)), (ABI, "2.0", None)],
        Some("fleetpatch-security"),
    );

    let results = apt
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    let installed: Vec<(&str, Option<&str>)> = results
        .installed
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_deref()))
        .collect();
    assert_eq!(installed, [(META, Some("2.0"))], "{results:?}");
    assert_eq!(installed_version(META).as_deref(), Some("2.0"));
    assert_eq!(
        installed_version(ABI).as_deref(),
        Some("2.0"),
        "the new dependency came along"
    );
}

/// The plan promises that an excluded package is never changed: an update that needs a
/// newer excluded package is held back, with a message that says why, and the other
/// updates still go in.
#[tokio::test]
async fn an_excluded_dependency_blocks_its_dependant() {
    if !prerequisites() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let _purge = Purge::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root, LIB, "1.0", None);
    install(root, APP, "1.0", Some(&format!("{LIB} (>= 1.0)")));
    install(root, OTHER, "1.0", None);
    let lib_2 = format!("{LIB} (>= 2.0)");
    let apt = repository(
        root,
        &[
            (APP, "2.0", Some(&lib_2)),
            (LIB, "2.0", None),
            (OTHER, "2.0", None),
        ],
        None,
    );

    let selection = PatchSelection {
        exclude: vec![LIB.into()],
        ..all()
    };
    let results = apt.apply(&selection, TIMEOUT).await.unwrap();
    assert_eq!(
        installed_version(LIB).as_deref(),
        Some("1.0"),
        "{results:?}"
    );
    assert_eq!(
        installed_version(APP).as_deref(),
        Some("1.0"),
        "{results:?}"
    );
    assert_eq!(
        installed_version(OTHER).as_deref(),
        Some("2.0"),
        "{results:?}"
    );
    assert_eq!(results.phase, ActionPhase::Failed, "{results:?}");
    let installed: Vec<&str> = results.installed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(installed, [OTHER], "{results:?}");
    assert_eq!(results.failed.len(), 1, "{results:?}");
    assert_eq!(results.failed[0].name, APP);
    assert_eq!(
        results.failed[0].message.as_deref(),
        Some(
            format!("not installed: {APP} 2.0 would also change {LIB}, which the plan excludes")
                .as_str()
        )
    );
}

/// unattended-upgrades (or a person's apt run) holding the dpkg lock makes the patcher
/// wait for it, not fail at once.
#[tokio::test]
async fn apt_waits_for_the_dpkg_lock() {
    if !prerequisites() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let _purge = Purge::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    install(root, DEMO, "1.0", None);
    let apt = repository(root, &[(DEMO, "2.0", None)], None);

    let held = Duration::from_secs(3);
    let lock = hold_dpkg_frontend_lock();
    let release = std::thread::spawn(move || {
        std::thread::sleep(held);
        drop(lock);
    });
    let started = Instant::now();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    release.join().unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(installed_version(DEMO).as_deref(), Some("2.0"));
    assert!(started.elapsed() >= held, "apt did not wait for the lock");
}

/// Takes the lock apt and dpkg take first (an fcntl write lock on
/// `/var/lib/dpkg/lock-frontend`), as another package manager run would.
fn hold_dpkg_frontend_lock() -> std::fs::File {
    use nix::fcntl::{FcntlArg, fcntl};
    let path = PathBuf::from("/var/lib/dpkg/lock-frontend");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    let lock = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_SETLK(&lock)).expect("the dpkg frontend lock is free");
    file
}
