//! Running one child process the way actions need it: contained (everything it starts
//! ends with it, see [`containment`]), a timeout, environment variables instead of
//! spliced code, and a bounded tail of its combined output.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::containment::{self, Ending, Limits, RunningRecord, Scope};

/// Where the host's namespaces are, when children must run in them (a node agent in a
/// container: `/proc/1/ns` with `hostPID`). Set once at start.
static HOST_NAMESPACES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The namespaces a child enters, in this order: mount last but one (it changes the
/// root), UTS, IPC and network. PID needs no entering: the pod shares the host's.
#[cfg(target_os = "linux")]
const NAMESPACES: [(&str, nix::sched::CloneFlags); 4] = [
    ("net", nix::sched::CloneFlags::CLONE_NEWNET),
    ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
    ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
    ("mnt", nix::sched::CloneFlags::CLONE_NEWNS),
];

/// From now on every child (scripts, package managers, the reboot command) runs in
/// the namespaces found under `dir` (e.g. `/proc/1/ns`): on the host, not in the
/// agent's container. Checks at once that they can be opened.
pub fn use_host_namespaces(dir: PathBuf) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        for (name, _) in NAMESPACES {
            std::fs::File::open(dir.join(name)).map_err(|err| {
                std::io::Error::new(
                    err.kind(),
                    format!("cannot open {}: {err}", dir.join(name).display()),
                )
            })?;
        }
        let _ = HOST_NAMESPACES.set(dir);
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "entering the host's namespaces is only possible on Linux",
        ))
    }
}

/// The host's root file system as this process sees it (`/proc/1/root` for
/// `/proc/1/ns`), when children run in the host's namespaces.
pub fn host_root() -> Option<PathBuf> {
    HOST_NAMESPACES
        .get()
        .and_then(|ns| ns.parent())
        .map(|process| process.join("root"))
}

/// Makes `command` start in the host's namespaces, if [`use_host_namespaces`] was
/// called. The namespace files are opened here, before the fork; the child only makes
/// system calls (`setns`, `chdir`), which is all that is safe between fork and exec.
pub fn enter_host_namespaces(
    command: &mut std::process::Command,
    current_dir: Option<&std::path::Path>,
) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if let Some(dir) = HOST_NAMESPACES.get() {
        use std::os::unix::process::CommandExt;
        let mut files = Vec::new();
        for (name, flag) in NAMESPACES {
            files.push((std::fs::File::open(dir.join(name))?, flag));
        }
        // Entering the mount namespace moves the child to its root; go back to the
        // working directory, which the host sees at the same path.
        let cwd = current_dir
            .map(|d| std::ffi::CString::new(d.as_os_str().as_encoded_bytes()))
            .transpose()
            .map_err(std::io::Error::other)?;
        // SAFETY: the closure only calls setns(2) and chdir(2) on data prepared before
        // the fork; it allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(move || {
                for (file, flag) in &files {
                    nix::sched::setns(file, *flag).map_err(std::io::Error::from)?;
                }
                if let Some(cwd) = &cwd {
                    nix::unistd::chdir(cwd.as_c_str()).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
    }
    let _ = (command, current_dir);
    Ok(())
}

/// The agent's variables every child gets, besides those of its [`ProcessSpec`]. On
/// Windows that is the system's set: installers and scripts expect `ProgramFiles`,
/// `SystemDrive`, `ComSpec`, `PATHEXT`, ... (`"$env:ProgramFiles\App\uninst.exe"`). Each
/// is also a reserved parameter name ([`crate::api::task::RESERVED_PARAMETER_NAMES`]) where
/// it can be one.
pub fn inherited_variables(windows: bool) -> &'static [&'static str] {
    const UNIX: &[&str] = &["PATH", "HOME", "LANG", "TEMP", "TMP"];
    const WINDOWS: &[&str] = &[
        "ALLUSERSPROFILE",
        "APPDATA",
        "CommonProgramFiles",
        "CommonProgramFiles(x86)",
        "CommonProgramW6432",
        "COMPUTERNAME",
        "ComSpec",
        "DriverData",
        "LOCALAPPDATA",
        "NUMBER_OF_PROCESSORS",
        "OS",
        "PATH",
        "PATHEXT",
        "PROCESSOR_ARCHITECTURE",
        "PROCESSOR_IDENTIFIER",
        "PROCESSOR_LEVEL",
        "PROCESSOR_REVISION",
        "ProgramData",
        "ProgramFiles",
        "ProgramFiles(x86)",
        "ProgramW6432",
        "PSModulePath",
        "PUBLIC",
        "SystemDrive",
        "SystemRoot",
        "TEMP",
        "TMP",
        "USERDOMAIN",
        "USERNAME",
        "USERPROFILE",
        "windir",
    ];
    if windows { WINDOWS } else { UNIX }
}

/// Well-known SIDs for icacls (`*SID`): account names are localised ("Administratoren").
const SYSTEM_SID: &str = "*S-1-5-18";
const ADMINISTRATORS_SID: &str = "*S-1-5-32-544";

/// `icacls.exe` by its absolute path under `%SystemRoot%`.
pub fn icacls_exe(system_root: Option<&str>) -> PathBuf {
    let root = system_root
        .filter(|root| !root.is_empty())
        .unwrap_or(r"C:\Windows")
        .trim_end_matches('\\');
    PathBuf::from(format!(r"{root}\System32\icacls.exe"))
}

/// The icacls runs, in order, that close `dir` to everyone but SYSTEM and
/// Administrators: everything in it back to inherited entries only (explicit grants
/// gone), then `dir` stops inheriting from its parent and grants full control to those
/// two alone, for itself and all it holds, then Administrators own all of it (an owner
/// can always rewrite an ACL).
pub fn state_dir_acl_commands(dir: &str) -> Vec<Vec<String>> {
    let full_control = |sid: &str| format!("{sid}:(OI)(CI)F");
    [
        vec![dir, "/reset", "/T", "/C", "/Q"],
        vec![
            dir,
            "/inheritance:r",
            "/grant:r",
            full_control(SYSTEM_SID).as_str(),
            full_control(ADMINISTRATORS_SID).as_str(),
            "/Q",
        ],
        vec![dir, "/setowner", ADMINISTRATORS_SID, "/T", "/C", "/Q"],
    ]
    .into_iter()
    .map(|args| args.into_iter().map(String::from).collect())
    .collect()
}

/// Gives the agent's state directory (journal, scripts, downloads) an ACL for SYSTEM and
/// Administrators only, so no local user can change a script that runs as SYSTEM. On
/// other systems it changes nothing.
pub fn protect_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(windows)]
    {
        let icacls = icacls_exe(std::env::var("SystemRoot").ok().as_deref());
        for args in state_dir_acl_commands(&dir.display().to_string()) {
            let output = std::process::Command::new(&icacls)
                .args(&args)
                .stdin(Stdio::null())
                .output()?;
            if !output.status.success() {
                return Err(std::io::Error::other(format!(
                    "{} {}: {}{}",
                    icacls.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
        }
    }
    let _ = dir;
    Ok(())
}

/// Most bytes of output kept as an action's message.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct ProcessSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub current_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// Keep the whole stdout (up to [`STDOUT_CAPTURE_BYTES`]) for parsing, besides the tail.
    pub capture_stdout: bool,
    /// While the action runs, this file holds its [`RunningRecord`], so an agent that
    /// restarts after a crash can end what the dead agent left running.
    pub running_file: Option<PathBuf>,
    /// Where the action's own cgroup is made; [`containment::cgroup_base`] if `None`.
    pub cgroup_base: Option<PathBuf>,
    pub limits: Limits,
}

/// Most stdout kept when [`ProcessSpec::capture_stdout`] is set.
pub const STDOUT_CAPTURE_BYTES: usize = 16 << 20;

/// How it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited(i32),
    /// Killed by a signal it did not ask for (not our timeout).
    Signalled(i32),
    /// Ran past its timeout; the whole process group was killed.
    TimedOut,
}

#[derive(Clone, Debug)]
pub struct ProcessOutcome {
    pub end: ProcessEnd,
    /// The last [`OUTPUT_TAIL_BYTES`] of stdout and stderr, interleaved as they arrived.
    pub output_tail: String,
    /// Full stdout when [`ProcessSpec::capture_stdout`] was set, else empty.
    pub stdout: String,
    pub duration: Duration,
    /// What ending the action's other processes found.
    pub ending: Ending,
    /// Limits that applied in a weaker form than asked.
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {program}: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// A ring of the last bytes of output.
#[derive(Default)]
struct Tail {
    bytes: std::collections::VecDeque<u8>,
    truncated: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        while self.bytes.len() > OUTPUT_TAIL_BYTES {
            self.bytes.pop_front();
            self.truncated = true;
        }
    }

    fn into_string(self) -> String {
        let bytes: Vec<u8> = self.bytes.into_iter().collect();
        let text = String::from_utf8_lossy(&bytes).trim_end().to_string();
        if self.truncated {
            // Start at a line boundary so the message does not open mid-word.
            let text = text
                .split_once('\n')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or(text);
            format!("…\n{text}")
        } else {
            text
        }
    }
}

async fn pump(
    mut reader: impl AsyncRead + Unpin,
    tail: std::sync::Arc<parking_lot::Mutex<Tail>>,
    capture: bool,
) -> Vec<u8> {
    let mut buffer = [0u8; 8192];
    let mut captured = Vec::new();
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.lock().push(&buffer[..n]);
                if capture && captured.len() < STDOUT_CAPTURE_BYTES {
                    captured.extend_from_slice(&buffer[..n]);
                }
            }
        }
    }
    captured
}

/// Runs `spec` to completion or timeout. Only [`inherited_variables`] and the given
/// variables reach the child. However it ends, everything it started ends with it
/// (see [`containment`]).
pub async fn run(spec: &ProcessSpec) -> Result<ProcessOutcome, ProcessError> {
    let program = spec.program.display().to_string();
    let spawn_error = |source| ProcessError::Spawn {
        program: program.clone(),
        source,
    };
    let mut std_command = std::process::Command::new(&spec.program);
    enter_host_namespaces(&mut std_command, spec.current_dir.as_deref()).map_err(spawn_error)?;
    let mut command = Command::from(std_command);
    command
        .args(&spec.args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for inherited in inherited_variables(cfg!(windows)) {
        if let Ok(value) = std::env::var(inherited) {
            command.env(inherited, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        command.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    command.envs(&spec.env);
    if let Some(dir) = &spec.current_dir {
        command.current_dir(dir);
    }
    #[cfg(unix)]
    command.process_group(0);
    command.kill_on_drop(true);
    let cgroup_base = spec.cgroup_base.clone().or_else(containment::cgroup_base);
    let mut scope = Scope::new(cgroup_base.as_deref(), spec.limits);
    scope.prepare(command.as_std_mut()).map_err(spawn_error)?;

    let started = Instant::now();
    let mut child = command.spawn().map_err(spawn_error)?;
    if let Some(pid) = child.id() {
        let record = scope.started(pid);
        if let Some(file) = &spec.running_file {
            let _ = std::fs::write(file, serde_json::to_vec(&record).unwrap_or_default());
        }
    }
    let tail = std::sync::Arc::new(parking_lot::Mutex::new(Tail::default()));
    let stdout = tokio::spawn(pump(
        child.stdout.take().expect("piped"),
        tail.clone(),
        spec.capture_stdout,
    ));
    let stderr = tokio::spawn(pump(
        child.stderr.take().expect("piped"),
        tail.clone(),
        false,
    ));

    let end = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(status) => exit_of(status.map_err(|source| ProcessError::Wait {
            program: program.clone(),
            source,
        })?),
        Err(_) => {
            let _ = child.kill().await;
            ProcessEnd::TimedOut
        }
    };
    // The first process is gone; whatever it started goes with it.
    let notes = scope.notes().to_vec();
    let ending = scope.end().await;
    if let Some(file) = &spec.running_file {
        let _ = std::fs::remove_file(file);
    }
    // Output pipes close once every process holding them is dead; don't wait forever
    // on one that escaped.
    let captured = tokio::time::timeout(Duration::from_secs(2), async {
        let captured = stdout.await.unwrap_or_default();
        let _ = stderr.await;
        captured
    })
    .await
    .unwrap_or_default();
    let output_tail = std::mem::take(&mut *tail.lock()).into_string();
    let stdout = String::from_utf8_lossy(&captured).into_owned();
    Ok(ProcessOutcome {
        end,
        output_tail,
        stdout,
        duration: started.elapsed(),
        ending,
        notes,
    })
}

/// Ends what an action recorded in `running_file` by a previous agent left running,
/// if anything, and removes the record.
pub fn end_recorded_action(running_file: &std::path::Path) {
    if let Ok(text) = std::fs::read(running_file) {
        match serde_json::from_slice::<RunningRecord>(&text) {
            Ok(record) => {
                let ending = containment::end_recorded(&record);
                if ending.leftovers > 0 {
                    tracing::warn!(
                        processes = ending.leftovers,
                        "ended what an interrupted action left running"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(file = %running_file.display(), error = %err, "an unreadable record of a running action");
            }
        }
        let _ = std::fs::remove_file(running_file);
    }
}

fn exit_of(status: std::process::ExitStatus) -> ProcessEnd {
    if let Some(code) = status.code() {
        return ProcessEnd::Exited(code);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return ProcessEnd::Signalled(signal);
        }
    }
    ProcessEnd::Exited(-1)
}

#[cfg(test)]
mod windows_tests {
    use super::*;

    #[test]
    fn windows_children_get_the_system_variables() {
        let windows = inherited_variables(true);
        for name in [
            "ProgramFiles",
            "ProgramFiles(x86)",
            "SystemDrive",
            "COMPUTERNAME",
            "PROCESSOR_ARCHITECTURE",
            "ComSpec",
            "PATHEXT",
            "USERPROFILE",
            "SystemRoot",
            "windir",
            "TEMP",
            "PATH",
        ] {
            assert!(windows.contains(&name), "{name}");
        }
        assert_eq!(
            inherited_variables(false),
            ["PATH", "HOME", "LANG", "TEMP", "TMP"]
        );
    }

    #[test]
    fn every_inherited_variable_a_parameter_could_name_is_reserved() {
        let name_rule = regex::Regex::new("^[A-Za-z_][A-Za-z0-9_]*$").unwrap();
        for name in inherited_variables(true)
            .iter()
            .chain(inherited_variables(false))
            .chain(&["LC_ALL"])
            .filter(|name| name_rule.is_match(name))
        {
            assert!(
                crate::api::task::RESERVED_PARAMETER_NAMES
                    .iter()
                    .any(|reserved| reserved.eq_ignore_ascii_case(name)),
                "{name} is not reserved"
            );
        }
    }

    #[test]
    fn the_state_directory_acl_names_sids_and_leaves_nothing_else() {
        let commands = state_dir_acl_commands(r"C:\var\lib\fleetpatch");
        assert_eq!(
            commands,
            [
                vec![r"C:\var\lib\fleetpatch", "/reset", "/T", "/C", "/Q"],
                vec![
                    r"C:\var\lib\fleetpatch",
                    "/inheritance:r",
                    "/grant:r",
                    "*S-1-5-18:(OI)(CI)F",
                    "*S-1-5-32-544:(OI)(CI)F",
                    "/Q"
                ],
                vec![
                    r"C:\var\lib\fleetpatch",
                    "/setowner",
                    "*S-1-5-32-544",
                    "/T",
                    "/C",
                    "/Q"
                ],
            ]
        );
        // Localised account names would fail on a German or French Windows.
        assert!(
            !commands
                .concat()
                .iter()
                .any(|a| a.contains("SYSTEM") || a.contains("Administrators"))
        );
        assert_eq!(
            icacls_exe(Some(r"C:\WINDOWS")),
            PathBuf::from(r"C:\WINDOWS\System32\icacls.exe")
        );
    }

    #[cfg(not(windows))]
    #[test]
    fn elsewhere_the_state_directory_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        protect_state_dir(dir.path()).unwrap();
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> ProcessSpec {
        ProcessSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout,
            ..ProcessSpec::default()
        }
    }

    #[tokio::test]
    async fn exit_code_and_output_are_captured() {
        let outcome = run(&sh(
            "echo out; echo err >&2; exit 3",
            Duration::from_secs(10),
        ))
        .await
        .unwrap();
        assert_eq!(outcome.end, ProcessEnd::Exited(3));
        assert!(
            outcome.output_tail.contains("out") && outcome.output_tail.contains("err"),
            "{}",
            outcome.output_tail
        );
    }

    #[tokio::test]
    async fn only_the_tail_of_long_output_is_kept() {
        let outcome = run(&sh(
            "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done",
            Duration::from_secs(10),
        ))
        .await
        .unwrap();
        assert!(outcome.output_tail.len() <= OUTPUT_TAIL_BYTES + 8);
        assert!(outcome.output_tail.ends_with("line-2999"));
        assert!(outcome.output_tail.starts_with("…\nline-"));
    }

    #[tokio::test]
    async fn environment_carries_parameters_and_nothing_else_leaks() {
        let mut spec = sh(
            "printf '%s|%s' \"$GREETING\" \"${CARGO_PKG_NAME:-unset}\"",
            Duration::from_secs(10),
        );
        spec.env.insert("GREETING".into(), "hello; rm -rf /".into());
        let outcome = run(&spec).await.unwrap();
        assert_eq!(outcome.output_tail, "hello; rm -rf /|unset");
    }
}
