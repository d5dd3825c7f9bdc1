//! The apt patcher against real packages: two versions of a throwaway .deb built with
//! `dpkg-deb`, a local repository made with `dpkg-scanpackages`, and an upgrade from
//! 1.0 to 2.0 through the patcher. apt reads only the test's own sources list and
//! package lists, so the host's configuration is not touched; the package itself is
//! installed for real and purged afterwards.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetpatch::agent::patcher::Patcher;
use fleetpatch::agent::patcher::apt::Apt;
use fleetpatch::api::patchjob::ActionPhase;
use fleetpatch::api::plan::{PatchClassification, PatchSelection};

const PACKAGE: &str = "fleetpatch-test-demo";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skips outside CI when the machine cannot run the test; fails in CI.
fn prerequisites() -> bool {
    let missing: Vec<&str> = ["dpkg-deb", "dpkg-scanpackages", "apt-get", "dpkg-query"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    let root = nix::unistd::Uid::effective().is_root();
    if missing.is_empty() && root {
        return true;
    }
    let why = format!(
        "apt patcher test needs root and {missing:?} (install dpkg-dev; scripts/test-all.sh does)"
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    false
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn build_deb(root: &Path, version: &str, out: &Path) {
    let tree = root.join(format!("tree-{version}"));
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("usr/share/fleetpatch-test-demo")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\nMaintainer: fleetpatch tests <tests@fleetpatch.invalid>\nDescription: throwaway package for the apt patcher test\n"
        ),
    )
    .unwrap();
    std::fs::write(tree.join("usr/share/fleetpatch-test-demo/VERSION"), version).unwrap();
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

fn installed_version() -> Option<String> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", PACKAGE])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
        .filter(|v| !v.is_empty())
}

struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

#[tokio::test]
async fn apt_upgrades_a_real_package_from_a_local_repository() {
    if !prerequisites() {
        return;
    }
    let _purge = Purge;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    build_deb(root, "1.0", &root.join("demo_1.0_all.deb"));
    build_deb(root, "2.0", &repo.join("demo_2.0_all.deb"));
    run(
        "dpkg",
        &["-i", root.join("demo_1.0_all.deb").to_str().unwrap()],
    );
    assert_eq!(installed_version().as_deref(), Some("1.0"));

    let packages = Command::new("dpkg-scanpackages")
        .args(["--multiversion", "."])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(packages.status.success());
    std::fs::write(repo.join("Packages"), &packages.stdout).unwrap();
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
    let apt = Apt {
        options: vec![
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/nonexistent".into(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache::Archives={}", archives.display()),
            "APT::Sandbox::User=root".into(),
        ],
        reboot_marker: root.join("reboot-required"),
        ..Apt::default()
    };

    // Security-only selection: the local repository is no security suite, so nothing is installed.
    let security = PatchSelection::default();
    let results = apt
        .apply(&security, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded);
    assert!(results.installed.is_empty(), "{results:?}");
    assert_eq!(installed_version().as_deref(), Some("1.0"));

    // Excluded: still nothing.
    let excluded = PatchSelection {
        classifications: vec![PatchClassification::All],
        exclude: vec![PACKAGE.into()],
        ..PatchSelection::default()
    };
    let results = apt
        .apply(&excluded, Duration::from_secs(300))
        .await
        .unwrap();
    assert!(results.installed.is_empty(), "{results:?}");

    // Everything: 1.0 → 2.0.
    let all = PatchSelection {
        classifications: vec![PatchClassification::All],
        ..PatchSelection::default()
    };
    let results = apt.apply(&all, Duration::from_secs(300)).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(results.patcher.as_deref(), Some("apt"));
    assert_eq!(results.installed.len(), 1, "{results:?}");
    assert_eq!(results.installed[0].name, PACKAGE);
    assert_eq!(results.installed[0].version.as_deref(), Some("2.0"));
    assert!(!results.reboot_required);
    assert_eq!(installed_version().as_deref(), Some("2.0"));
    assert_eq!(
        std::fs::read_to_string(format!("/usr/share/{PACKAGE}/VERSION")).unwrap(),
        "2.0"
    );
}
