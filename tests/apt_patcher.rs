//! The apt patcher against real packages: throwaway .debs built with `dpkg-deb`, local
//! repositories made with `dpkg-scanpackages` (with a Release file when the test needs
//! a `-security` suite), and real upgrades through the patcher, by the real apt-get and
//! dpkg. Each test has a host of its own in a temporary directory: a dpkg root with its
//! own package database, and an apt configuration (`APT_CONFIG`) that reads nothing of
//! the machine's (no sources, no `apt.conf.d` hooks) and keeps its lists, caches, logs
//! and locks there too. Nothing is installed on the machine, and its package database,
//! apt state and logs are never written; each test checks that at its end. Root is not
//! needed: dpkg unpacks with `--force-not-root`.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetpatch::agent::executor::{self, Executor, RunOutcome};
use fleetpatch::agent::journal::{JobRecord, Journal};
use fleetpatch::agent::patcher::apt::{self, Apt};
use fleetpatch::agent::patcher::{Commands, Patcher};
use fleetpatch::agent::reboot::SimulatedRebooter;
use fleetpatch::api::common::ObjectRef;
use fleetpatch::api::conditions;
use fleetpatch::api::patchjob::{
    ActionPhase, JobPhase, PatchJobSpec, ResolvedAction, ResolvedScript,
};
use fleetpatch::api::plan::{PatchClassification, PatchFailWhen, PatchSelection, RebootPolicy};
use fleetpatch::api::task::TaskType;
use fleetpatch::api::workflow::{FailurePolicy, PreFailurePolicy};
use fleetpatch::api::{OperatingSystem, ScriptLanguage};
use support::prerequisite;

// Names no other test uses, so the check that none reached the machine means this run.
const DEMO: &str = "fleetpatch-sandboxed-demo";
const META: &str = "fleetpatch-sandboxed-meta";
const ABI: &str = "fleetpatch-sandboxed-abi-2";
const APP: &str = "fleetpatch-sandboxed-app";
const LIB: &str = "fleetpatch-sandboxed-lib";
const OTHER: &str = "fleetpatch-sandboxed-other";
const RIVAL: &str = "fleetpatch-sandboxed-rival";
const EVERY_PACKAGE: &[&str] = &[DEMO, META, ABI, APP, LIB, OTHER, RIVAL];

/// Skips outside CI when the machine cannot run the test; fails in CI.
fn prerequisites() -> bool {
    let missing: Vec<&str> = [
        "dpkg",
        "dpkg-deb",
        "dpkg-scanpackages",
        "apt-get",
        "dpkg-query",
    ]
    .into_iter()
    .filter(|p| !prerequisite::on_path(p))
    .collect();
    if !missing.is_empty() {
        prerequisite::missing(&format!(
            "apt patcher tests need {missing:?} (install dpkg-dev; scripts/test-all.sh does)"
        ));
        return false;
    }
    // Not root: dpkg unpacks into the test's own root with --force-not-root.
    true
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The test's own host: `root/` is what dpkg installs into, with its database in
/// `root/var/lib/dpkg`; apt's configuration, sources, lists, caches and logs are beside it.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let sandbox = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let dir = sandbox.dir.path();
        for sub in [
            "root/var/lib/dpkg/updates",
            "root/var/lib/dpkg/info",
            "root/run",
            "apt.conf.d",
            "preferences.d",
            "sources.list.d",
            "state/lists/partial",
            "cache/archives/partial",
            "log",
            "repo",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(sandbox.admin_dir().join("status"), "").unwrap();
        // Read before any other configuration, so the machine's apt.conf(.d) never is.
        let setting = |key: &str, value: &Path| format!("{key} \"{}\";\n", value.display());
        let config = [
            setting("Dir::Etc::Parts", &dir.join("apt.conf.d")),
            setting("Dir::Etc::Main", Path::new("/dev/null")),
            setting("Dir::Etc::PreferencesParts", &dir.join("preferences.d")),
            setting("Dir::Etc::Preferences", Path::new("/dev/null")),
            setting("Dir::Etc::SourceList", &dir.join("sources.list")),
            setting("Dir::Etc::SourceParts", &dir.join("sources.list.d")),
            setting("Dir::State", &dir.join("state")),
            // apt takes dpkg's locks in the directory of this file.
            setting("Dir::State::status", &sandbox.admin_dir().join("status")),
            setting("Dir::Cache", &dir.join("cache")),
            setting("Dir::Log", &dir.join("log")),
            // The repository is in the test's private temporary directory.
            "APT::Sandbox::User \"root\";\n".to_string(),
            format!(
                "DPkg::Options {{ \"--root={}\"; \"--log={}\"; \"--force-not-root\"; }};\n",
                sandbox.root().display(),
                dir.join("log/dpkg.log").display()
            ),
        ]
        .concat();
        std::fs::write(dir.join("apt.conf"), config).unwrap();
        sandbox
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What dpkg installs into: the host's `/` for this test.
    fn root(&self) -> PathBuf {
        self.path().join("root")
    }

    fn admin_dir(&self) -> PathBuf {
        self.root().join("var/lib/dpkg")
    }

    /// Builds `name` `version` into `out`; `relations` are more control lines
    /// (`Depends: lib (>= 2.0)`), or empty.
    fn build_deb(&self, name: &str, version: &str, relations: &str, out: &Path) {
        let tree = self.path().join(format!("tree-{name}-{version}"));
        std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(tree.join(format!("usr/share/{name}"))).unwrap();
        let relations = if relations.is_empty() {
            String::new()
        } else {
            format!("{relations}\n")
        };
        std::fs::write(
            tree.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: {version}\nArchitecture: all\n{relations}Maintainer: fleetpatch tests <tests@fleetpatch.invalid>\nDescription: throwaway package for the apt patcher tests\n"
            ),
        )
        .unwrap();
        std::fs::write(tree.join(format!("usr/share/{name}/VERSION")), version).unwrap();
        run(
            "dpkg-deb",
            &["--root-owner-group", "--build", text(&tree), text(out)],
        );
    }

    /// Builds `name` `version` and installs it into the sandbox's root.
    fn install(&self, name: &str, version: &str, relations: &str) {
        let deb = self.path().join(format!("{name}_{version}_all.deb"));
        self.build_deb(name, version, relations, &deb);
        let root = format!("--root={}", self.root().display());
        let log = format!("--log={}", self.path().join("log/dpkg.log").display());
        run("dpkg", &["--force-not-root", &root, &log, "-i", text(&deb)]);
        assert_eq!(self.installed_version(name).as_deref(), Some(version));
    }

    /// A local repository of `packages` (name, version, relations) and an apt patcher
    /// that reads only it. With `suite`, the repository has a Release file naming that
    /// suite.
    fn repository(&self, packages: &[(&str, &str, &str)], suite: Option<&str>) -> Apt {
        let repo = self.path().join("repo");
        for (name, version, relations) in packages {
            self.build_deb(
                name,
                version,
                relations,
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
        std::fs::write(
            self.path().join("sources.list"),
            format!("deb [trusted=yes] file:{} ./\n", repo.display()),
        )
        .unwrap();
        let variable = |name: &str, value: &Path| (name.to_string(), value.display().to_string());
        Apt {
            options: Vec::new(),
            // As a node agent sees the host: under the host's root.
            reboot_marker: apt::reboot_marker(Some(&self.root())),
            commands: Commands {
                path: None,
                env: BTreeMap::from([
                    variable("APT_CONFIG", &self.path().join("apt.conf")),
                    variable("DPKG_ROOT", &self.root()),
                    variable("DPKG_ADMINDIR", &self.admin_dir()),
                ]),
            },
        }
    }

    /// `apt-mark args...` with the sandbox's configuration; its output.
    fn apt_mark(&self, args: &[&str]) -> String {
        let output = Command::new("apt-mark")
            .args(args)
            .env("APT_CONFIG", self.path().join("apt.conf"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "apt-mark {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn installed_version(&self, package: &str) -> Option<String> {
        let admin_dir = format!("--admindir={}", self.admin_dir().display());
        let output = Command::new("dpkg-query")
            .args([&admin_dir, "-W", "-f=${Status} ${Version}", package])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let version = text.strip_prefix("install ok installed ")?;
        (output.status.success() && !version.is_empty()).then(|| version.to_string())
    }

    /// The file the package `name` installs, as the sandbox holds it.
    fn file_of(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.root().join(format!("usr/share/{name}/VERSION"))).ok()
    }
}

/// Nothing of the tests reached the machine: none of their packages is in its package
/// database, none of their files is in its `/usr/share`, its apt and dpkg logs never
/// name them.
fn machine_untouched() {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let status = read("/var/lib/dpkg/status");
    let logs = [
        read("/var/log/dpkg.log"),
        read("/var/log/apt/history.log"),
        read("/var/log/apt/term.log"),
    ]
    .concat();
    for package in EVERY_PACKAGE {
        assert!(
            !status.contains(&format!("Package: {package}\n")),
            "{package} is in the machine's dpkg database"
        );
        assert!(
            !Path::new("/usr/share").join(package).exists(),
            "/usr/share/{package} is on the machine"
        );
        assert!(!logs.contains(package), "the machine's logs name {package}");
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
    let host = Sandbox::new();
    host.install(DEMO, "1.0", "");
    let apt = host.repository(&[(DEMO, "2.0", "")], None);

    // Security-only selection: the local repository is no security suite, so nothing is installed.
    let results = apt
        .apply(&PatchSelection::default(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded);
    assert!(results.installed.is_empty(), "{results:?}");
    assert_eq!(host.installed_version(DEMO).as_deref(), Some("1.0"));

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
    assert_eq!(host.installed_version(DEMO).as_deref(), Some("2.0"));
    assert_eq!(host.file_of(DEMO).as_deref(), Some("2.0"));

    // The host says it needs a reboot: the marker is read under the host's root (a node
    // agent's /proc/1/root), never the agent's own /run.
    assert!(
        apt.reboot_marker.starts_with(host.root()),
        "{}",
        apt.reboot_marker.display()
    );
    std::fs::write(&apt.reboot_marker, "*** System restart required ***\n").unwrap();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert!(results.reboot_required, "{results:?}");
    machine_untouched();
}

/// Like `linux-image-amd64`, whose new version depends on a new ABI package
/// (`linux-image-6.1.0-99-amd64`): `apt-get upgrade` keeps it back, so a security
/// patch run never installed kernel fixes.
#[tokio::test]
async fn a_package_whose_new_version_needs_a_new_dependency_is_selected() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(META, "1.0", "");
    let depends_abi = format!("Depends: {ABI}");
    let apt = host.repository(
        &[(META, "2.0", &depends_abi), (ABI, "2.0", "")],
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
    assert_eq!(host.installed_version(META).as_deref(), Some("2.0"));
    assert_eq!(
        host.installed_version(ABI).as_deref(),
        Some("2.0"),
        "the new dependency came along"
    );
    machine_untouched();
}

/// The plan promises that an excluded package is never changed: an update that needs a
/// newer excluded package is held back, with a message that says why, and the other
/// updates still go in. One installed and one held back is a patch step that succeeded
/// with a failure (JetPatch), unless the plan says `failWhen: AnyFailed`.
#[tokio::test]
async fn an_excluded_dependency_blocks_its_dependant() {
    if !prerequisites() {
        return;
    }
    for (fail_when, phase) in [
        (PatchFailWhen::AllFailed, ActionPhase::Succeeded),
        (PatchFailWhen::AnyFailed, ActionPhase::Failed),
    ] {
        let (host, apt) = app_needing_an_excluded_lib();
        let selection = PatchSelection {
            exclude: vec![LIB.into()],
            fail_when,
            ..all()
        };
        let results = apt.apply(&selection, TIMEOUT).await.unwrap();
        assert_eq!(
            host.installed_version(LIB).as_deref(),
            Some("1.0"),
            "{results:?}"
        );
        assert_eq!(
            host.installed_version(APP).as_deref(),
            Some("1.0"),
            "{results:?}"
        );
        assert_eq!(
            host.installed_version(OTHER).as_deref(),
            Some("2.0"),
            "{results:?}"
        );
        assert_eq!(results.phase, phase, "{fail_when:?}: {results:?}");
        let installed: Vec<&str> = results.installed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(installed, [OTHER], "{results:?}");
        assert_eq!(results.failed.len(), 1, "{results:?}");
        assert_eq!(results.failed[0].name, APP);
        assert_eq!(
            results.failed[0].message.as_deref(),
            Some(
                format!(
                    "not installed: {APP} 2.0 would also change {LIB}, which the plan excludes"
                )
                .as_str()
            )
        );
    }
    machine_untouched();
}

/// Runs a job with the real apt patcher, its journal, work directory and a simulated
/// rebooter under `state`, to its end.
async fn run_job(apt: &Apt, spec: PatchJobSpec, state: &Path) -> JobRecord {
    let journal = Journal::open(state).unwrap();
    let rebooter = SimulatedRebooter {
        counter_file: state.join("boot"),
    };
    let executor = Executor {
        journal: &journal,
        work_dir: state.join("work"),
        patcher: Some(apt),
        rebooter: &rebooter,
        minute: Duration::from_secs(60),
        max_download_bytes: 1 << 20,
        on_event: &|_, _| {},
        reboot_gate: None,
        cancel: None,
        reboot_refusal: None,
    };
    let mut record = executor::new_record("job-1", "job-1", spec);
    let outcome = executor.run(&mut record).await.unwrap();
    assert_eq!(outcome, RunOutcome::Finished);
    record
}

/// apt marks only security updates: Bugfix (and Critical alone) is refused with a job
/// message that says so, never widened to every update.
#[tokio::test]
async fn bugfix_on_apt_is_refused_with_a_job_message_not_widened() {
    if !prerequisites() {
        return;
    }
    for classification in [PatchClassification::Bugfix, PatchClassification::Critical] {
        let host = Sandbox::new();
        host.install(DEMO, "1.0", "");
        let apt = host.repository(&[(DEMO, "2.0", "")], None);
        let state = tempfile::tempdir().unwrap();
        let spec = PatchJobSpec {
            agent: "sandbox".into(),
            plan: String::new(),
            run: String::new(),
            os: OperatingSystem::Linux,
            workflow: None,
            pre_actions: vec![],
            post_actions: vec![],
            failure_policy: FailurePolicy::default(),
            patches: PatchSelection {
                classifications: vec![classification],
                ..PatchSelection::default()
            },
            reboot: RebootPolicy::Never,
            deadline: None,
            node: None,
        };
        let record = run_job(&apt, spec, state.path()).await;
        let status = &record.status;
        assert_eq!(
            host.installed_version(DEMO).as_deref(),
            Some("1.0"),
            "{status:?}"
        );
        let patches = status.patches.as_ref().unwrap();
        assert_eq!(patches.phase, ActionPhase::Failed, "{patches:?}");
        assert!(patches.installed.is_empty());
        assert_eq!(status.phase, JobPhase::Failed);
        let expected = format!("apt cannot select {classification:?} updates");
        assert!(status.message.starts_with(&expected), "{}", status.message);
        assert!(
            patches.message.starts_with(&expected),
            "{}",
            patches.message
        );
    }
    machine_untouched();
}

/// A host with APP 1.0 on LIB 1.0 and OTHER 1.0, and a repository where APP 2.0 needs
/// LIB 2.0 and OTHER 2.0 needs nothing.
fn app_needing_an_excluded_lib() -> (Sandbox, Apt) {
    let host = Sandbox::new();
    host.install(LIB, "1.0", "");
    host.install(APP, "1.0", &format!("Depends: {LIB} (>= 1.0)"));
    host.install(OTHER, "1.0", "");
    let lib_2 = format!("Depends: {LIB} (>= 2.0)");
    let apt = host.repository(
        &[(APP, "2.0", &lib_2), (LIB, "2.0", ""), (OTHER, "2.0", "")],
        None,
    );
    (host, apt)
}

/// Qualys: every patch of a job is attempted whatever the pre actions did. A pre action
/// fails under the failure policy `Continue`; the real patch step still runs and
/// installs every update it can, and the one it cannot is listed: the patch step
/// succeeded (JetPatch) and the job carries `PatchesPartiallyFailed`. The job itself
/// failed, for its failed action.
#[tokio::test]
async fn patches_are_attempted_after_a_failing_pre_action_under_continue() {
    if !prerequisites() {
        return;
    }
    let (host, apt) = app_needing_an_excluded_lib();
    let state = tempfile::tempdir().unwrap();
    let failing = "echo pre-check failed; exit 3\n";
    let pre = ResolvedAction {
        name: "failing-pre-check".into(),
        task: ObjectRef::default(),
        action_type: TaskType::RunScript,
        timeout_minutes: 1,
        success_exit_codes: vec![0],
        parameters: BTreeMap::new(),
        bypass_execution_policy: false,
        script: Some(ResolvedScript {
            source: ObjectRef::default(),
            language: ScriptLanguage::Sh,
            content: failing.into(),
            sha256: {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(failing.as_bytes()))
            },
            signature: None,
        }),
        detection_script: None,
        download: None,
        change_registry_key: None,
        uninstall_software: None,
        reboot: None,
        limits: None,
    };
    let spec = PatchJobSpec {
        agent: "sandbox".into(),
        plan: String::new(),
        run: String::new(),
        os: OperatingSystem::Linux,
        workflow: None,
        pre_actions: vec![pre],
        post_actions: vec![],
        failure_policy: FailurePolicy {
            pre: PreFailurePolicy::Continue,
            ..FailurePolicy::default()
        },
        patches: PatchSelection {
            exclude: vec![LIB.into()],
            ..all()
        },
        reboot: RebootPolicy::Never,
        deadline: None,
        node: None,
    };
    let record = run_job(&apt, spec, state.path()).await;
    let status = &record.status;
    assert_eq!(
        status.pre_actions[0].phase,
        ActionPhase::Failed,
        "{status:?}"
    );
    assert_eq!(status.pre_actions[0].exit_code, Some(3));
    let patches = status.patches.as_ref().expect("the patch step ran");
    assert_eq!(patches.patcher.as_deref(), Some("apt"), "{patches:?}");
    assert_eq!(patches.phase, ActionPhase::Succeeded, "{patches:?}");
    let installed: Vec<&str> = patches.installed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(installed, [OTHER], "{patches:?}");
    let failed: Vec<&str> = patches.failed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(failed, [APP], "{patches:?}");
    assert_eq!(host.installed_version(OTHER).as_deref(), Some("2.0"));
    assert_eq!(host.installed_version(APP).as_deref(), Some("1.0"));
    let partial = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::PATCHES_PARTIALLY_FAILED)
        .expect("PatchesPartiallyFailed is set");
    assert_eq!(partial.status, conditions::TRUE);
    assert_eq!(partial.message, format!("1 of 2 patch(es) failed: {APP}"));
    assert_eq!(status.phase, JobPhase::Failed, "the pre action failed");
    assert_eq!(status.message, "action failing-pre-check failed");
    assert!(!state.path().join("boot").exists(), "no reboot");
    machine_untouched();
}

/// `apt-get install` marks what it is given as manually installed, even when it only
/// upgrades it: a library that came as a dependency would then never be autoremoved.
/// The patcher keeps apt's marks as they were.
#[tokio::test]
async fn upgraded_dependencies_stay_automatically_installed() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(LIB, "1.0", "");
    host.install(APP, "1.0", &format!("Depends: {LIB}"));
    let apt = host.repository(
        &[(LIB, "2.0", ""), (APP, "2.0", &format!("Depends: {LIB}"))],
        None,
    );
    host.apt_mark(&["auto", LIB]);
    assert_eq!(host.apt_mark(&["showauto"]).trim(), LIB);

    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(host.installed_version(LIB).as_deref(), Some("2.0"));
    assert_eq!(host.installed_version(APP).as_deref(), Some("2.0"));
    assert_eq!(
        host.apt_mark(&["showauto"]).trim(),
        LIB,
        "{LIB} is still a dependency apt may autoremove, {APP} still manually installed"
    );
    machine_untouched();
}

/// An update whose new version conflicts with an installed package would remove it:
/// apt keeps it back even with `--with-new-pkgs`, and a patch run removes nothing. The
/// result says so instead of leaving it out silently; the other updates go in.
#[tokio::test]
async fn an_update_that_would_remove_a_package_is_named_as_kept_back() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(APP, "1.0", "");
    host.install(RIVAL, "1.0", "");
    host.install(OTHER, "1.0", "");
    let conflict = format!("Conflicts: {RIVAL}");
    let apt = host.repository(&[(APP, "2.0", &conflict), (OTHER, "2.0", "")], None);
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    let installed: Vec<&str> = results.installed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(installed, [OTHER], "{results:?}");
    assert!(
        results.message.ends_with(&format!("not installed: {APP}")),
        "{}",
        results.message
    );
    assert_eq!(host.installed_version(APP).as_deref(), Some("1.0"));
    assert_eq!(host.installed_version(RIVAL).as_deref(), Some("1.0"));
    machine_untouched();
}

/// unattended-upgrades (or a person's apt run) holding the dpkg lock makes the patcher
/// wait for it, not fail at once.
#[tokio::test]
async fn apt_waits_for_the_dpkg_lock() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(DEMO, "1.0", "");
    let apt = host.repository(&[(DEMO, "2.0", "")], None);

    let held = Duration::from_secs(3);
    let lock = hold_dpkg_frontend_lock(&host.admin_dir());
    let release = std::thread::spawn(move || {
        std::thread::sleep(held);
        drop(lock);
    });
    let started = Instant::now();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    release.join().unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(host.installed_version(DEMO).as_deref(), Some("2.0"));
    assert!(started.elapsed() >= held, "apt did not wait for the lock");
    machine_untouched();
}

/// apt-daily's `apt-get update` (or a person's) holding the package lists' lock makes
/// the patcher's own update wait for it, not fail the patch run at once.
#[tokio::test]
async fn apt_waits_for_the_package_lists_lock() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(DEMO, "1.0", "");
    let apt = host.repository(&[(DEMO, "2.0", "")], None);

    let held = Duration::from_secs(3);
    let lock = hold_lock(&host.path().join("state/lists/lock"));
    let release = std::thread::spawn(move || {
        std::thread::sleep(held);
        drop(lock);
    });
    let started = Instant::now();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    release.join().unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    assert_eq!(host.installed_version(DEMO).as_deref(), Some("2.0"));
    assert!(started.elapsed() >= held, "apt did not wait for the lock");
    machine_untouched();
}

/// Takes the lock apt and dpkg take first (an fcntl write lock on `lock-frontend` in
/// dpkg's database directory), as another package manager run would.
fn hold_dpkg_frontend_lock(admin_dir: &Path) -> std::fs::File {
    hold_lock(&admin_dir.join("lock-frontend"))
}

/// An fcntl write lock on `path`, as apt and dpkg take their locks.
fn hold_lock(path: &Path) -> std::fs::File {
    use nix::fcntl::{FcntlArg, fcntl};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    let lock = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_SETLK(&lock)).expect("the lock is free");
    file
}

/// needrestart (installed by default on Ubuntu 22.04 and later) hooks into apt's
/// `DPkg::Post-Invoke` and, in its default mode, restarts every service using an
/// upgraded library — the agent's own unit included, in the middle of the patch run it
/// is reporting. The agent's apt runs carry `NEEDRESTART_SUSPEND` (the hook then does
/// nothing) and `NEEDRESTART_MODE=l` (list only, for a needrestart run another way), as
/// a hook emulating needrestart's records: restarts are left to the reboot policy.
#[tokio::test]
async fn apt_runs_keep_needrestart_from_restarting_services() {
    if !prerequisites() {
        return;
    }
    let host = Sandbox::new();
    host.install(DEMO, "1.0", "");
    let apt = host.repository(&[(DEMO, "2.0", "")], None);
    let seen = host.path().join("needrestart-saw");
    std::fs::write(
        host.path().join("apt.conf.d/99needrestart"),
        format!(
            "DPkg::Post-Invoke {{ \"echo suspend=$NEEDRESTART_SUSPEND mode=$NEEDRESTART_MODE >> {}\"; }};\n",
            seen.display()
        ),
    )
    .unwrap();
    let results = apt.apply(&all(), TIMEOUT).await.unwrap();
    assert_eq!(results.phase, ActionPhase::Succeeded, "{results:?}");
    let saw = std::fs::read_to_string(&seen).expect("the post-invoke hook ran");
    assert!(
        saw.lines().all(|line| line == "suspend=1 mode=l"),
        "needrestart's hook would restart services: {saw:?}"
    );
    machine_untouched();
}
