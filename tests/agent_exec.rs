//! `fleetpatch agent exec` with real processes, real timeouts and signals, a real HTTP
//! server for downloads, a crash by `kill -9`, and a simulated reboot.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetpatch::api::patchjob::{ActionPhase, JobPhase, PatchJobStatus, RebootState};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_fleetpatch");

/// A scratch directory with manifests and a state directory.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    /// A scratch host whose manifests may say `@DIR@` for the scratch directory.
    fn new(manifests: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = Host { dir };
        host.write(manifests);
        host
    }

    fn write(&self, manifests: &str) {
        let manifests = manifests.replace("@DIR@", &self.dir.path().display().to_string());
        std::fs::write(self.path("manifests.yaml"), manifests).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `agent exec` of `workflow` whose reboots are simulated and allowed.
    fn command(&self, workflow: &str, extra: &[&str]) -> Command {
        let mut command = self.command_refusing_reboots(workflow, extra);
        command.arg("--allow-reboot");
        command
    }

    /// `agent exec` of `workflow` without `--allow-reboot`. Reboots stay simulated,
    /// and the harness forbids real ones anyway (`FLEETPATCH_FORBID_REAL_REBOOT`).
    fn command_refusing_reboots(&self, workflow: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["agent", "exec", "-f"])
            .arg(self.path("manifests.yaml"))
            .args(["--workflow", workflow, "--state-dir"])
            .arg(self.path("state"))
            .args(["--minute-ms", "400", "--simulate-reboot"])
            .env("FLEETPATCH_FORBID_REAL_REBOOT", "1")
            .args(extra);
        command
    }

    fn exec(&self, workflow: &str, extra: &[&str]) -> Output {
        self.command(workflow, extra).output().unwrap()
    }

    /// Runs with `-o json` and returns (exit code, status).
    fn exec_json(&self, workflow: &str, extra: &[&str]) -> (i32, PatchJobStatus) {
        let mut args = vec!["-o", "json"];
        args.extend_from_slice(extra);
        let output = self.exec(workflow, &args);
        Self::json_status(&output)
    }

    fn json_status(output: &Output) -> (i32, PatchJobStatus) {
        let stdout = String::from_utf8_lossy(&output.stdout);
        let status: PatchJobStatus = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "not a PatchJob status ({e}):\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap(), status)
    }
}

/// A Script and a RunScript Task named `name` running `body` with bash. Scripts see
/// the test's scratch directory as `$DIR` (a parameter default).
fn run_script(name: &str, body: &str, extra_task_spec: &str) -> String {
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: {name}}}\nspec:\n  language: Bash\n  parameters: [{{name: DIR, default: \"@DIR@\"}}]\n  content: |\n{body}---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: {name}}}\nspec:\n  os: Linux\n  type: RunScript\n  timeoutMinutes: 5\n{extra_task_spec}  runScript:\n    scriptRef: {{name: {name}}}\n---\n"
    )
}

fn workflow(name: &str, pre: &[&str], post: &[&str], policy: &str) -> String {
    let steps = |tasks: &[&str]| -> String {
        if tasks.is_empty() {
            " []\n".to_string()
        } else {
            tasks
                .iter()
                .map(|t| format!("\n  - taskRef: {{name: {t}}}"))
                .collect::<String>()
                + "\n"
        }
    };
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {{name: {name}}}\nspec:\n  os: Linux\n  preTasks:{}  postTasks:{}  failurePolicy: {policy}\n---\n",
        steps(pre),
        steps(post)
    )
}

fn phases(results: &[fleetpatch::api::patchjob::ActionResult]) -> Vec<ActionPhase> {
    results.iter().map(|r| r.phase).collect()
}

/// The examples as they are, but for the run log, which goes to the test's own
/// directory instead of `/tmp` (no test writes outside its temporary directories).
fn examples_logging_to(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let copy = dir.join("examples");
    let log = dir.join("fleetpatch-runs.log");
    for file in walk(&source) {
        let target = copy.join(file.strip_prefix(&source).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &target,
            text.replace("/tmp/fleetpatch-runs.log", &log.display().to_string()),
        )
        .unwrap();
    }
    copy
}

#[test]
fn linux_examples_run_on_this_host() {
    let state = tempfile::tempdir().unwrap();
    let examples = examples_logging_to(state.path());
    let output = Command::new(BIN)
        .args(["agent", "exec", "-f"])
        .arg(&examples)
        .args(["--workflow", "linux-standard", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "pre  1/1 check-disk-space                 running",
        "pre  1/1 check-disk-space                 Succeeded exit 0",
        "post 1/3 record-patch-run                 Succeeded exit 0",
        "post 3/3 linux-reboot-if-required         Skipped: no reboot required",
        "job Succeeded",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    let log = std::fs::read_to_string(state.path().join("fleetpatch-runs.log")).unwrap();
    assert!(log.contains(" patched on kernel "), "{log}");
}

#[test]
fn exit_codes_follow_the_seed_convention() {
    let mut manifests = String::new();
    manifests += &run_script("zero", "exit 0", "");
    manifests += &run_script("ten", "echo patched; exit 10", "");
    manifests += &run_script("eleven", "echo broke; exit 11", "");
    manifests += &run_script("three-allowed", "exit 3", "  successExitCodes: [0, 3]\n");
    manifests += &run_script("four", "echo 'disk on fire' >&2; exit 4", "");
    manifests += &workflow(
        "codes",
        &[],
        &["zero", "ten", "eleven", "three-allowed", "four"],
        "{post: Continue}",
    );
    let host = Host::new(&manifests);
    let (code, status) = host.exec_json("codes", &["--reboot", "never"]);
    assert_eq!(code, 1, "a failed action fails the job");
    assert_eq!(status.phase, JobPhase::Failed);
    let summary: Vec<(ActionPhase, Option<i32>, bool)> = status
        .post_actions
        .iter()
        .map(|a| (a.phase, a.exit_code, a.reboot_requested))
        .collect();
    assert_eq!(
        summary,
        [
            (ActionPhase::Succeeded, Some(0), false),
            (ActionPhase::Succeeded, Some(10), true),
            (ActionPhase::Failed, Some(11), true),
            (ActionPhase::Succeeded, Some(3), false),
            (ActionPhase::Failed, Some(4), false),
        ]
    );
    assert_eq!(
        status.post_actions[4].message, "disk on fire",
        "the output tail is the action's message"
    );
    let reboot = status.reboot.unwrap();
    assert_eq!(
        reboot.state,
        RebootState::RequiredNotPerformed,
        "--reboot never records the pending reboot"
    );
    assert_eq!(reboot.requested_by.as_deref(), Some("ten"));
    assert_eq!(status.progress.as_deref(), Some("5/5"));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Failed" && c.status == "True")
    );
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    // The script starts a grandchild that would outlive a plain kill of the script.
    let manifests = run_script(
        "hang",
        "sleep 300 &\necho $! > \"$DIR/grandchild.pid\"\necho waiting\nwait",
        "",
    )
    .replace("  timeoutMinutes: 5\n", "  timeoutMinutes: 1\n")
        + &run_script("after", "echo next", "")
        + &workflow("slow", &[], &["hang", "after"], "{post: Continue}");
    let host = Host::new(&manifests);
    let started = Instant::now();
    let (_, status) = host.exec_json("slow", &[]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 400 ms 'minute' timeout was not applied"
    );
    let hang = &status.post_actions[0];
    assert_eq!(hang.phase, ActionPhase::TimedOut, "{hang:?}");
    assert!(
        hang.message
            .starts_with("timed out after 1 minute(s); the action was killed"),
        "{}",
        hang.message
    );
    assert!(
        hang.message.contains("waiting"),
        "output before the timeout is kept: {}",
        hang.message
    );
    assert_eq!(
        status.post_actions[1].phase,
        ActionPhase::Succeeded,
        "the next action runs after a timeout"
    );
    let pid: i32 = std::fs::read_to_string(host.path("grandchild.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ");
    assert!(!alive, "grandchild {pid} survived the timeout");
}

#[test]
fn parameters_arrive_as_environment_variables_not_code() {
    let manifests = "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {name: greet}\nspec:\n  language: Bash\n  parameters: [{name: GREETING}, {name: TARGET, default: world}]\n  content: |\n    printf '%s, %s' \"$GREETING\" \"$TARGET\"\n---\n\
        apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: greet}\nspec:\n  os: Linux\n  type: RunScript\n  runScript:\n    scriptRef: {name: greet}\n    parameters: {GREETING: \"$(touch injected); hello\"}\n---\n"
        .to_string()
        + &workflow("params", &["greet"], &[], "{}");
    let host = Host::new(&manifests);
    let (code, status) = host.exec_json("params", &[]);
    assert_eq!(code, 0);
    assert_eq!(
        status.pre_actions[0].message,
        "$(touch injected); hello, world"
    );
    assert!(!host.path("state/work").join("injected").exists());
}

#[test]
fn abort_patching_policy_stops_pre_tasks_and_skips_patching() {
    let mut manifests = String::new();
    manifests += &run_script("fails", "exit 1", "");
    manifests += &run_script("second", "echo ran >> \"$DIR/never\"", "");
    manifests += &run_script("cleanup", "echo cleaned", "");
    manifests += &workflow(
        "strict",
        &["fails", "second"],
        &["cleanup"],
        "{pre: AbortPatching, runPostTasksAfterPatchFailure: true}",
    );
    manifests += &workflow(
        "strict-no-post",
        &["fails", "second"],
        &["cleanup"],
        "{pre: AbortPatching, runPostTasksAfterPatchFailure: false}",
    );
    manifests += &workflow(
        "lenient",
        &["fails", "second"],
        &["cleanup"],
        "{pre: Continue}",
    );
    let host = Host::new(&manifests);

    let (code, status) = host.exec_json("strict", &["--patches", "all"]);
    assert_eq!(code, 1);
    assert_eq!(
        phases(&status.pre_actions),
        [ActionPhase::Failed, ActionPhase::NotRun]
    );
    assert_eq!(
        status.pre_actions[1].message,
        "not run: pre-patching task fails failed"
    );
    let patches = status.patches.unwrap();
    assert_eq!(
        patches.phase,
        ActionPhase::NotRun,
        "patching is skipped after a pre failure"
    );
    assert_eq!(
        phases(&status.post_actions),
        [ActionPhase::Succeeded],
        "post tasks still run when configured"
    );

    let (_, status) = host.exec_json("strict-no-post", &["--patches", "all"]);
    assert_eq!(phases(&status.post_actions), [ActionPhase::NotRun]);

    let (_, status) = host.exec_json("lenient", &[]);
    assert_eq!(
        phases(&status.pre_actions),
        [ActionPhase::Failed, ActionPhase::Succeeded],
        "Continue runs the rest"
    );
    assert_eq!(
        status.patches.unwrap().phase,
        ActionPhase::Skipped,
        "--patches none skips patching, not as a failure"
    );
    assert_eq!(phases(&status.post_actions), [ActionPhase::Succeeded]);
}

#[test]
fn stop_remaining_policy_stops_post_tasks_after_a_failure() {
    let mut manifests = String::new();
    manifests += &run_script("ok", "true", "");
    manifests += &run_script("fails", "exit 2", "");
    manifests += &run_script("later", "true", "");
    manifests += &workflow(
        "stop",
        &[],
        &["ok", "fails", "later"],
        "{post: StopRemaining}",
    );
    manifests += &workflow("go-on", &[], &["ok", "fails", "later"], "{post: Continue}");
    let host = Host::new(&manifests);
    let (_, status) = host.exec_json("stop", &[]);
    assert_eq!(
        phases(&status.post_actions),
        [
            ActionPhase::Succeeded,
            ActionPhase::Failed,
            ActionPhase::NotRun
        ]
    );
    let (_, status) = host.exec_json("go-on", &[]);
    assert_eq!(
        phases(&status.post_actions),
        [
            ActionPhase::Succeeded,
            ActionPhase::Failed,
            ActionPhase::Succeeded
        ]
    );
}

/// Serves `body` to every request on 127.0.0.1 until the test ends.
fn serve(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{address}/files/tool_2.0_all.deb")
}

/// An InstallSoftware workflow without a detection script, whose install script exits
/// with each of `exits` in turn (one task per code), writing a marker first.
fn undetected_install_manifests(source: &str, sha256: &str, exits: &[i32]) -> String {
    let mut manifests = String::new();
    let mut tasks = Vec::new();
    for code in exits {
        manifests += &format!(
            "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: install-{code}}}\nspec:\n  language: Bash\n  content: |\n    echo installed >> \"$DIR/installed-{code}\"\n    exit {code}\n  parameters: [{{name: DIR, default: \"@DIR@\"}}]\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: tool-{code}}}\nspec:\n  os: Linux\n  type: InstallSoftware\n  installSoftware:\n    source: {source}\n    sha256: {sha256}\n    installScriptRef: {{name: install-{code}}}\n---\n"
        );
        tasks.push(format!("tool-{code}"));
    }
    let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
    manifests + &workflow("install", &[], &tasks, "{post: Continue}")
}

fn install_manifests(source: &str, sha256: &str, detection_exit: i32) -> String {
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: detect}}\nspec:\n  language: Sh\n  content: |\n    echo checking\n    exit {detection_exit}\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: install}}\nspec:\n  language: Bash\n  content: |\n    echo \"installing $FLEETPATCH_DOWNLOAD_PATH\"\n    cat \"$FLEETPATCH_DOWNLOAD_PATH\" > \"$DIR/installed\"\n  parameters: [{{name: DIR, default: \"@DIR@\"}}]\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: install-tool}}\nspec:\n  os: Linux\n  type: InstallSoftware\n  installSoftware:\n    source: {source}\n    sha256: {sha256}\n    detectionScriptRef: {{name: detect}}\n    installScriptRef: {{name: install}}\n---\n"
    ) + &workflow("install", &["install-tool"], &[], "{}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn install_software_downloads_verifies_and_installs() {
    let payload = b"pretend this is a .deb".to_vec();
    let url = serve(payload.clone());
    let host = Host::new("");
    let marker = host.path("installed");
    host.write(&install_manifests(
        &format!("{{protocol: Http, url: \"{url}\"}}"),
        &sha256_hex(&payload),
        0,
    ));
    let (code, status) = host.exec_json("install", &[]);
    let action = &status.pre_actions[0];
    assert_eq!(code, 0, "{action:?}");
    assert_eq!(action.phase, ActionPhase::Succeeded);
    assert!(
        action.message.contains("installing ") && action.message.contains("tool_2.0_all.deb"),
        "{}",
        action.message
    );
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        payload,
        "the install script read the verified file"
    );
}

#[test]
fn a_wrong_checksum_fails_the_action_and_deletes_the_file() {
    let url = serve(b"tampered bytes".to_vec());
    let host = Host::new("");
    let marker = host.path("installed");
    let wrong = sha256_hex(b"the real installer");
    host.write(&install_manifests(
        &format!("{{protocol: Http, url: \"{url}\"}}"),
        &wrong,
        0,
    ));
    let (code, status) = host.exec_json("install", &[]);
    assert_eq!(code, 1);
    let action = &status.pre_actions[0];
    assert_eq!(action.phase, ActionPhase::Failed);
    assert!(
        action
            .message
            .starts_with("checksum mismatch for tool_2.0_all.deb: expected sha256"),
        "{}",
        action.message
    );
    assert!(!marker.exists(), "the install script must not run");
    let leftovers: Vec<_> = walk(&host.path("state/work"));
    assert!(
        leftovers
            .iter()
            .all(|p| !p.to_string_lossy().contains("tool_2.0")),
        "downloaded file left behind: {leftovers:?}"
    );
}

/// Without a detection script the install script runs straight away, and its exit code
/// means what a RunScript's does: 10 installed and a reboot needed, 11 failed and a
/// reboot needed.
#[test]
fn without_a_detection_script_the_install_runs_and_its_exit_code_says_the_outcome() {
    let payload = b"installer".to_vec();
    let host = Host::new("");
    let share = host.path("share.deb");
    std::fs::write(&share, &payload).unwrap();
    host.write(&undetected_install_manifests(
        &format!("{{protocol: NetworkShare, unc: \"{}\"}}", share.display()),
        &sha256_hex(&payload),
        &[0, 10, 11],
    ));
    let (code, status) = host.exec_json("install", &["--reboot", "never"]);
    assert_eq!(code, 1, "exit 11 fails the job");
    let summary: Vec<(ActionPhase, Option<i32>, bool)> = status
        .post_actions
        .iter()
        .map(|a| (a.phase, a.exit_code, a.reboot_requested))
        .collect();
    assert_eq!(
        summary,
        [
            (ActionPhase::Succeeded, Some(0), false),
            (ActionPhase::Succeeded, Some(10), true),
            (ActionPhase::Failed, Some(11), true),
        ]
    );
    for code in [0, 10, 11] {
        assert_eq!(
            std::fs::read_to_string(host.path(&format!("installed-{code}"))).unwrap(),
            "installed\n",
            "the install script of tool-{code} ran once, without detection"
        );
    }
    assert_eq!(
        status.reboot.unwrap().state,
        RebootState::RequiredNotPerformed
    );
}

#[test]
fn a_detection_script_saying_not_needed_skips_the_install() {
    let payload = b"installer".to_vec();
    let host = Host::new("");
    let share = host.path("share.deb");
    std::fs::write(&share, &payload).unwrap();
    let marker = host.path("installed");
    let manifests = install_manifests(
        &format!("{{protocol: NetworkShare, unc: \"{}\"}}", share.display()),
        &sha256_hex(&payload),
        1,
    );
    host.write(&manifests);
    let (code, status) = host.exec_json("install", &[]);
    assert_eq!(code, 0, "Skipped is not a failure");
    let action = &status.pre_actions[0];
    assert_eq!(action.phase, ActionPhase::Skipped);
    assert_eq!(action.exit_code, Some(1));
    assert!(
        action
            .message
            .starts_with("not needed: the detection script exited 1"),
        "{}",
        action.message
    );
    assert!(!marker.exists());

    // The same task with detection saying "install" copies from the mounted share.
    host.write(&manifests.replace("exit 1", "exit 0"));
    let (code, _) = host.exec_json("install", &[]);
    assert_eq!(code, 0);
    assert_eq!(std::fs::read(&marker).unwrap(), payload);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn registry_actions_say_they_need_windows() {
    let manifests = "apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: reg}\nspec:\n  os: Windows\n  type: ChangeRegistryKey\n  changeRegistryKey: {keyPath: 'HKEY_LOCAL_MACHINE\\SOFTWARE\\X', valueType: REG_SZ, valueName: a, valueData: b}\n---\n\
        apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: win}\nspec:\n  os: Windows\n  preTasks: [{taskRef: {name: reg}}]\n";
    let host = Host::new(manifests);
    let (code, status) = host.exec_json("win", &[]);
    assert_eq!(code, 1);
    // The message names the host's own system, not the job's.
    let message = &status.pre_actions[0].message;
    assert!(
        message.starts_with("ChangeRegistryKey requires Windows; this host runs "),
        "{message}"
    );
    assert!(!message.ends_with("runs Windows"), "{message}");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    if let Some(name) = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
    {
        assert!(message.ends_with(name.trim_matches('"')), "{message}");
    }
}

#[test]
fn uninstall_on_linux_fails_cleanly_naming_the_host() {
    let manifests = "apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: rm}\nspec:\n  os: Windows\n  type: UninstallSoftware\n  uninstallSoftware: {uninstallKey: 'HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\App', displayName: App}\n---\n\
        apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: win}\nspec:\n  os: Windows\n  preTasks: [{taskRef: {name: rm}}]\n";
    let host = Host::new(manifests);
    let (code, status) = host.exec_json("win", &[]);
    assert_eq!(code, 1);
    let message = &status.pre_actions[0].message;
    assert!(
        message.starts_with("UninstallSoftware requires Windows; this host runs "),
        "{message}"
    );
    assert!(!message.ends_with("runs Windows"), "{message}");
}

#[test]
fn a_crashed_agent_resumes_and_never_runs_an_action_twice() {
    let mut manifests = String::new();
    manifests += &run_script("first", "echo first >> \"$DIR/log\"", "");
    manifests += &run_script(
        "slow",
        "echo slow >> \"$DIR/log\"\nsleep 30\necho slow-finished >> \"$DIR/log\"",
        "",
    );
    manifests += &run_script("last", "echo last >> \"$DIR/log\"", "");
    manifests += &workflow("crash", &["first", "slow"], &["last"], "{pre: Continue}");
    let host = Host::new(&manifests);
    let log = host.path("log");

    let mut agent = host
        .command("crash", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("slow")
    {
        assert!(Instant::now() < deadline, "the slow action never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    agent.wait().unwrap();

    let (code, status) = host.exec_json("crash", &[]);
    assert_eq!(
        phases(&status.pre_actions),
        [ActionPhase::Succeeded, ActionPhase::Interrupted]
    );
    assert!(
        status.pre_actions[1]
            .message
            .contains("it was not run again")
    );
    assert_eq!(phases(&status.post_actions), [ActionPhase::Succeeded]);
    assert_eq!(code, 1, "an interrupted action fails the job");
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines,
        ["first", "slow", "last"],
        "each action ran once and the orphaned one was stopped"
    );
}

#[test]
fn a_reboot_waits_for_the_patches_and_the_job_completes_after_the_host_is_back() {
    let mut manifests = String::new();
    manifests += &run_script(
        "pre-wants-reboot",
        "echo \"pre $(cat \"$DIR/log\" 2>/dev/null | wc -l)\" >> \"$DIR/log\"; exit 10",
        "",
    );
    manifests += &run_script("post-step", "echo post >> \"$DIR/log\"", "");
    manifests += "apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: reboot-if-required}\nspec:\n  os: Linux\n  type: Reboot\n  reboot: {onlyIfRequired: true}\n---\n";
    manifests += &workflow(
        "reboots",
        &["pre-wants-reboot"],
        &["post-step", "reboot-if-required"],
        "{}",
    );
    let host = Host::new(&manifests);
    let log = host.path("log");

    let first = host.exec("reboots", &[]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(
        first.status.code(),
        Some(3),
        "exit 3 while the host reboots:\n{stdout}"
    );
    assert!(
        stdout.contains("reboot  starting (requested by pre-wants-reboot)"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre 0\npost\n",
        "the pre action's reboot waited until after patching and post tasks"
    );

    // The "host" is back: the restarted agent finishes the job without running anything again.
    let (code, status) = host.exec_json("reboots", &[]);
    assert_eq!(code, 0, "{status:?}");
    assert_eq!(status.phase, JobPhase::Succeeded);
    let reboot = status.reboot.unwrap();
    assert_eq!(reboot.state, RebootState::Completed);
    assert!(reboot.completed_at.is_some());
    assert_eq!(status.post_actions[1].phase, ActionPhase::Succeeded);
    assert_eq!(status.post_actions[1].message, "host rebooted");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre 0\npost\n",
        "nothing ran twice"
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
    );

    // A new run of the same workflow starts a new job (the finished one is not resumed),
    // and a second reboot request within that job is still only one reboot.
    let again = host.exec("reboots", &[]);
    assert_eq!(again.status.code(), Some(3));
}

#[test]
fn without_allow_reboot_a_required_reboot_is_reported_and_not_performed() {
    let mut manifests = String::new();
    manifests += &run_script("wants-reboot", "exit 10", "");
    manifests += "apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: reboot-if-required}\nspec:\n  os: Linux\n  type: Reboot\n  reboot: {onlyIfRequired: true}\n---\n";
    manifests += &workflow(
        "needs-reboot",
        &["wants-reboot"],
        &["reboot-if-required"],
        "{}",
    );
    let host = Host::new(&manifests);
    let boots = host.path("state/simulated-boot-id");

    let text = host
        .command_refusing_reboots("needs-reboot", &[])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("reboot  required: reboot not performed")
            && stdout.contains("--allow-reboot"),
        "the output says the reboot was left out and how to allow it:\n{stdout}"
    );
    assert!(!boots.exists(), "nothing rebooted, not even in simulation");

    let output = host
        .command_refusing_reboots("needs-reboot", &["-o", "json"])
        .output()
        .unwrap();
    let (code, status) = Host::json_status(&output);
    assert_eq!(code, 0, "{status:?}");
    assert_eq!(status.phase, JobPhase::Succeeded);
    let reboot = status.reboot.clone().unwrap();
    assert_eq!(reboot.state, RebootState::RequiredNotPerformed);
    assert_eq!(reboot.requested_by.as_deref(), Some("wants-reboot"));
    assert_eq!(status.post_actions[0].phase, ActionPhase::Skipped);
    assert!(
        status.post_actions[0].message.contains("--allow-reboot")
            && status.message.contains("--allow-reboot"),
        "{status:?}"
    );
    assert!(!boots.exists(), "nothing rebooted, not even in simulation");

    // The same job with --allow-reboot reboots (in simulation).
    let allowed = host.exec("needs-reboot", &[]);
    assert_eq!(
        allowed.status.code(),
        Some(3),
        "exit 3 while the host reboots"
    );
    assert_eq!(std::fs::read_to_string(&boots).unwrap(), "1");
}

#[test]
fn at_most_one_reboot_per_job() {
    let mut manifests = String::new();
    manifests += &run_script("a", "exit 10", "");
    manifests += &run_script("b", "exit 10", "");
    manifests += &workflow("two-requests", &["a"], &["b"], "{}");
    let host = Host::new(&manifests);
    let first = host.exec("two-requests", &[]);
    assert_eq!(first.status.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(host.path("state/simulated-boot-id")).unwrap(),
        "1"
    );
    let (code, status) = host.exec_json("two-requests", &[]);
    assert_eq!(code, 0);
    assert_eq!(status.reboot.unwrap().state, RebootState::Completed);
    assert_eq!(
        std::fs::read_to_string(host.path("state/simulated-boot-id")).unwrap(),
        "1",
        "one reboot for two requests"
    );
}

/// Live processes (not zombies) that mention `needle` in their command line or
/// environment: what an action under `needle`'s scratch directory left running.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let read = |file: &str| std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
        let mentions = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).contains(needle);
        if mentions(read("cmdline")) || mentions(read("environ")) {
            found.push(format!(
                "{pid}: {}",
                String::from_utf8_lossy(&read("cmdline")).replace('\0', " ")
            ));
        }
    }
    found
}

/// Waits (bounded) until no live process mentions `needle`; returns those that remain.
fn leftovers(needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let found = processes_mentioning(needle);
        if found.is_empty() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Scripts that start a process which would touch `$DIR/NAME` three seconds later, each
/// escaping the script's process group its own way, and then either hang until their
/// timeout or exit at once.
fn escapes(hang: bool) -> Vec<(&'static str, String)> {
    let rest = if hang {
        "echo started; sleep 300"
    } else {
        "echo started; exit 0"
    };
    let touch = |name: &str| format!("sleep 3; touch \"$DIR/{name}\"");
    vec![
        (
            "double-fork",
            format!("( sh -c '{}' & ) \n{rest}", touch("double-fork")),
        ),
        (
            "setsid",
            format!("setsid sh -c '{}' &\n{rest}", touch("setsid")),
        ),
        (
            "nohup",
            format!("nohup sh -c '{}' >/dev/null 2>&1 &\n{rest}", touch("nohup")),
        ),
        // No marker variable survives `env -i`: only the subreaper (or a cgroup) finds it.
        (
            "cleared-env",
            format!(
                "setsid env -i DIR=\"$DIR\" sh -c 'sleep 3; touch \"$DIR/cleared-env\"' &\n{rest}"
            ),
        ),
    ]
}

/// No process of `host`'s actions runs any more, and none wrote its file.
fn assert_nothing_left(host: &Host, names: &[&str]) {
    let scratch = host.dir.path().display().to_string();
    assert_eq!(leftovers(&scratch), Vec::<String>::new(), "still running");
    for name in names {
        assert!(!host.path(name).exists(), "{name} wrote its file");
    }
}

fn contained_host(hang: bool) -> (Host, Vec<&'static str>) {
    let mut manifests = String::new();
    let mut names = Vec::new();
    for (name, body) in escapes(hang) {
        manifests +=
            &run_script(name, &body, "").replace("  timeoutMinutes: 5\n", "  timeoutMinutes: 1\n");
        names.push(name);
    }
    manifests += &workflow("escapes", &[], &names, "{post: Continue}");
    (Host::new(&manifests), names)
}

#[test]
fn nothing_an_action_starts_outlives_its_timeout() {
    let (host, names) = contained_host(true);
    let (_, status) = host.exec_json("escapes", &[]);
    for (name, result) in names.iter().zip(&status.post_actions) {
        assert_eq!(result.phase, ActionPhase::TimedOut, "{name}: {result:?}");
    }
    assert_nothing_left(&host, &names);
}

#[test]
fn nothing_a_finished_action_started_outlives_it_and_the_message_says_so() {
    let (host, names) = contained_host(false);
    let (code, status) = host.exec_json("escapes", &[]);
    assert_eq!(code, 0, "{status:?}");
    for (name, result) in names.iter().zip(&status.post_actions) {
        assert_eq!(result.phase, ActionPhase::Succeeded, "{name}: {result:?}");
        assert!(
            result
                .message
                .contains("were still running when it ended and were killed"),
            "{name}: {}",
            result.message
        );
    }
    assert_nothing_left(&host, &names);
}

#[test]
fn what_an_action_left_running_when_the_agent_was_killed_ends_when_it_restarts() {
    let body = "setsid sh -c 'sleep 300' &\nnohup sh -c 'sleep 300' >/dev/null 2>&1 &\n( sh -c 'sleep 300' & )\necho ready > \"$DIR/ready\"\nsleep 300";
    let manifests =
        run_script("daemons", body, "") + &workflow("crash", &["daemons"], &[], "{pre: Continue}");
    let host = Host::new(&manifests);
    let mut agent = host
        .command("crash", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host.path("ready").exists() {
        assert!(Instant::now() < deadline, "the action never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    agent.wait().unwrap();
    let scratch = host.dir.path().display().to_string();
    assert!(
        processes_mentioning(&scratch).len() >= 4,
        "the daemons outlived the agent, as they would after a crash"
    );
    let (_, status) = host.exec_json("crash", &[]);
    assert_eq!(phases(&status.pre_actions), [ActionPhase::Interrupted]);
    assert_eq!(
        leftovers(&scratch),
        Vec::<String>::new(),
        "still running after the restart"
    );
}

#[test]
fn an_action_over_its_memory_limit_fails_and_says_why() {
    // The shell keeps the whole command substitution in memory: 256 MiB of it.
    let body = "s=$(head -c 268435456 /dev/zero | tr '\\0' x)\necho \"got ${#s}\"";
    let manifests = run_script("hungry", body, "  limits: {maxMemory: 32Mi}\n")
        + &run_script(
            "modest",
            "echo fine",
            "  limits: {maxMemory: 32Mi, cpuWeight: 50}\n",
        )
        + &workflow("memory", &[], &["hungry", "modest"], "{post: Continue}");
    let host = Host::new(&manifests);
    let (_, status) = host.exec_json("memory", &[]);
    let hungry = &status.post_actions[0];
    assert_eq!(hungry.phase, ActionPhase::Failed, "{hungry:?}");
    assert!(
        hungry.message.contains("maxMemory 32Mi"),
        "{}",
        hungry.message
    );
    assert!(
        !hungry.message.contains("got 268435456"),
        "{}",
        hungry.message
    );
    assert_eq!(status.post_actions[1].phase, ActionPhase::Succeeded);
}

/// A fresh cgroup v2 directory for one test, removed at the end, where this machine
/// lets the test make one; else why not.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> Result<Self, String> {
        let mount = fleetpatch::agent::containment::cgroup2_mount()
            .ok_or("no cgroup2 file system is mounted")?;
        let dir = mount.join(format!("fleetpatch-test-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cgroup = TestCgroup(dir);
        if !cgroup.0.join("cgroup.kill").exists() {
            return Err("the kernel has no cgroup.kill (before 5.14)".into());
        }
        Ok(cgroup)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn with_a_cgroup_each_action_has_its_own_and_it_ends_with_cgroup_kill() {
    let cgroup = match TestCgroup::new() {
        Ok(cgroup) => cgroup,
        Err(why) => {
            support::prerequisite::missing(&format!(
                "the cgroup test needs a cgroup v2 hierarchy it may make a child in (root): {why}"
            ));
            return;
        }
    };
    let body = "cat /proc/self/cgroup > \"$DIR/cgroup\"\nsetsid env -i DIR=\"$DIR\" sh -c 'sleep 3; touch \"$DIR/escaped\"' &\nsleep 300";
    let manifests = run_script("boxed", body, "")
        .replace("  timeoutMinutes: 5\n", "  timeoutMinutes: 1\n")
        + &workflow("boxed", &[], &["boxed"], "{post: Continue}");
    let host = Host::new(&manifests);
    let base = cgroup.0.display().to_string();
    let (_, status) = host.exec_json("boxed", &["--action-cgroup", &base]);
    assert_eq!(
        status.post_actions[0].phase,
        ActionPhase::TimedOut,
        "{status:?}"
    );
    let seen = std::fs::read_to_string(host.path("cgroup")).unwrap();
    let name = cgroup.0.file_name().unwrap().to_str().unwrap();
    assert!(seen.contains(&format!("/{name}/action-")), "{seen}");
    let scratch = host.dir.path().display().to_string();
    assert_eq!(leftovers(&scratch), Vec::<String>::new(), "still running");
    assert!(!host.path("escaped").exists());
    let children: Vec<_> = std::fs::read_dir(&cgroup.0)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(
        children.is_empty(),
        "the action's cgroup was left: {children:?}"
    );
}

/// Attack (a hostile script, then a killed agent): the restarted agent finds what a
/// cut-off action left only through `running.json` in the job's work directory — the
/// script's own working directory. A script that removes it and kills the agent leaves
/// processes that carry the marker, sit in the action's process group (and cgroup),
/// and none of it is looked for: they outlive the action, which is reported
/// `Interrupted` as if all had ended.
#[test]
fn a_script_that_removes_the_running_record_and_kills_the_agent_leaves_nothing_running() {
    let body = "( sleep 8; touch \"$DIR/escaped\" ) &\necho ready > \"$DIR/ready\"\nrm -f running.json\nkill -9 $PPID\nsleep 300";
    let manifests =
        run_script("hostile", body, "") + &workflow("crash", &["hostile"], &[], "{pre: Continue}");
    let host = Host::new(&manifests);
    let mut agent = host
        .command("crash", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = agent.wait().unwrap();
    assert!(host.path("ready").exists(), "the script ran: {status:?}");
    let scratch = host.dir.path().display().to_string();
    let (_, status) = host.exec_json("crash", &[]);
    assert_eq!(phases(&status.pre_actions), [ActionPhase::Interrupted]);
    let left = leftovers(&scratch);
    for line in &left {
        if let Some(pid) = line.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    assert_eq!(
        left,
        Vec::<String>::new(),
        "still running after the restarted agent reported the action Interrupted"
    );
}
