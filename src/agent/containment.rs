//! Containment: when an action ends — success, failure, timeout or cancellation —
//! everything it started ends with it, and so does whatever an agent that crashed left
//! running.
//!
//! On Linux an action's processes are found in three ways, each catching what the
//! others can miss:
//! - its own cgroup, when the agent runs in a delegated cgroup v2 subtree (the systemd
//!   unit's `Delegate=yes`, or a container's cgroup namespace); it ends with
//!   `cgroup.kill`, and carries the Task's `maxMemory` and `cpuWeight`;
//! - a marker variable ([`MARKER_VAR`]) that every descendant inherits, found in
//!   `/proc/*/environ` — `setsid`, `nohup` and double forks keep it;
//! - the agent is a child subreaper: a daemonized descendant is re-parented to the
//!   agent instead of to init, so even one that cleared its environment is found.
//!
//! A service that a script starts through the service manager (`systemctl start`) is
//! the service manager's child, not the action's, and is left alone: that is how a
//! script installs a service.
//!
//! On Windows each action runs in a Job Object that kills every process in it when the
//! action ends; that code path is compiled and its arithmetic tested here, but it has
//! not run on Windows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Every process of an action carries `FLEETPATCH_ACTION_ID=<id of that run>`.
pub const MARKER_VAR: &str = "FLEETPATCH_ACTION_ID";

/// The Task's optional resource limits, as the job carries them: bytes of memory for
/// the whole action, and a CPU weight on cgroup v2's scale (1–10000, 100 the default).
pub use crate::api::patchjob::ResolvedLimits as Limits;

/// What an agent that restarts after a crash needs to end what an action left
/// running. Written when the action's first process starts, removed when it ends.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunningRecord {
    /// The action's first process, the leader of its process group.
    pub pid: u32,
    /// That process's start time (`/proc/PID/stat`, clock ticks since boot): a pid
    /// that was reused since is never signalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
    /// The value of [`MARKER_VAR`] in the action's processes.
    pub marker: String,
    /// The action's cgroup, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// How an action's processes ended, beyond the exit status of its first one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// The kernel killed a process of the action for exceeding `maxMemory`.
    pub out_of_memory: bool,
    /// Descendants still running when the action ended, now killed.
    pub leftovers: usize,
}

/// The cgroup under which actions get their own, when the agent found a delegated one.
static CGROUP_BASE: OnceLock<PathBuf> = OnceLock::new();

/// Direct children started by [`super::process::run`] (tokio reaps those), and how
/// many actions run now: an orphan re-parented to the agent is attributed to an
/// action only while exactly one runs.
static CHILDREN: parking_lot::Mutex<Children> = parking_lot::Mutex::new(Children {
    pids: BTreeSet::new(),
    running: 0,
});

struct Children {
    pids: BTreeSet<u32>,
    running: usize,
}

/// Makes this process a child subreaper (Linux), so that what an action daemonizes is
/// re-parented to the agent. The agent calls this once at start.
pub fn become_subreaper() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
}

/// What every agent does once at start: become a subreaper, and take a delegated
/// cgroup for the actions if it runs in one. Neither is required; what is missing is
/// logged and the actions run with what remains.
pub fn start_agent(action_cgroup: Option<&Path>) -> Result<(), String> {
    if let Err(err) = become_subreaper() {
        tracing::warn!(error = %err, "cannot become a child subreaper: descendants an action daemonizes are found by their marker only");
    }
    if let Some(base) = action_cgroup {
        // Named by the admin: it must work, and the agent itself stays where it is.
        prepare_base(base, false)?;
        let _ = CGROUP_BASE.set(base.to_path_buf());
        tracing::info!(cgroup = %base.display(), "each action runs in its own cgroup");
        return Ok(());
    }
    match use_delegated_cgroup() {
        Ok(base) => tracing::info!(cgroup = %base.display(), "each action runs in its own cgroup"),
        Err(why) => tracing::info!(reason = %why, "actions run without a cgroup of their own"),
    }
    Ok(())
}

/// Looks for a delegated cgroup v2 subtree for this agent and, if there is one, makes
/// it the parent of every action's cgroup: the agent moves itself into a leaf
/// (`agent`), and the memory and cpu controllers are enabled for the actions where the
/// subtree offers them. Delegated means systemd marked it so (`Delegate=yes` sets the
/// `trusted.delegate` attribute) or it is the root of a container's cgroup namespace;
/// a cgroup that merely happens to be writable (a root shell's session scope) is not
/// taken. Returns the base, or why there is none.
pub fn use_delegated_cgroup() -> Result<PathBuf, String> {
    let (own, namespace_root) = own_cgroup().ok_or("this host has no cgroup v2 hierarchy")?;
    if !namespace_root && !marked_delegated(&own) {
        return Err(format!(
            "{} is not delegated to the agent (run it from a unit with Delegate=yes)",
            own.display()
        ));
    }
    prepare_base(&own, true)?;
    let _ = CGROUP_BASE.set(own.clone());
    Ok(own)
}

/// Whether systemd delegated `dir` (`trusted.delegate` or `user.delegate` is `1`).
fn marked_delegated(dir: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return false;
        };
        ["trusted.delegate", "user.delegate"].iter().any(|name| {
            let name = std::ffi::CString::new(*name).expect("no NUL");
            let mut value = [0u8; 8];
            // SAFETY: both strings are NUL-terminated and `value` is writable for
            // its whole length.
            let read = unsafe {
                nix::libc::getxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            read > 0 && value[..read as usize] == *b"1"
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        false
    }
}

/// The base [`use_delegated_cgroup`] found.
pub fn cgroup_base() -> Option<PathBuf> {
    CGROUP_BASE.get().cloned()
}

/// This process's cgroup v2 directory (the `0::` line of `/proc/self/cgroup` under the
/// cgroup2 mount), and whether it is the root of this process's cgroup namespace while
/// not the host's root (a container's own cgroup).
fn own_cgroup() -> Option<(PathBuf, bool)> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
    let dir = own_dir(relative)?;
    let namespace_root = relative == "/" && dir.join("cgroup.kill").exists();
    Some((dir, namespace_root))
}

fn own_dir(relative: &str) -> Option<PathBuf> {
    Some(cgroup2_mount()?.join(relative.trim_start_matches('/')))
}

/// Where this process sees the cgroup v2 hierarchy mounted (`/proc/self/mountinfo`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split(' ').next() == Some("cgroup2"))
            .then(|| fields.split(' ').nth(4).map(PathBuf::from))?
    })
}

/// Checks that `base` is a delegated cgroup this process may manage (only a non-root
/// cgroup has `cgroup.kill`, and its files must be writable), optionally moves this
/// process into a leaf of it, and enables what controllers it can for children.
pub fn prepare_base(base: &Path, move_self: bool) -> Result<(), String> {
    if !base.join("cgroup.kill").exists() {
        return Err(format!(
            "{} is not a delegated cgroup (no cgroup.kill: the root cgroup, or a kernel before 5.14)",
            base.display()
        ));
    }
    let writable = |file: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(base.join(file))
            .is_ok()
    };
    if !writable("cgroup.procs") || !writable("cgroup.subtree_control") {
        return Err(format!("{} is not writable by the agent", base.display()));
    }
    if move_self {
        let leaf = base.join("agent");
        create_dir(&leaf)?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|err| format!("moving the agent into {}: {err}", leaf.display()))?;
    }
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["memory", "cpu"] {
        if available.split_whitespace().any(|c| c == controller) {
            // Fails when processes sit in `base` itself; the actions then run without it.
            if let Err(err) = std::fs::write(
                base.join("cgroup.subtree_control"),
                format!("+{controller}"),
            ) {
                tracing::warn!(cgroup = %base.display(), %controller, error = %err, "cannot enable a controller for actions");
            }
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(format!("creating cgroup {}: {err}", dir.display())),
    }
}

/// One action's containment, from before its first process starts until everything
/// it started has ended.
pub struct Scope {
    marker: String,
    limits: Limits,
    cgroup: Option<PathBuf>,
    /// Limits that could not be applied as asked, for the action's message.
    notes: Vec<String>,
    /// The action's first process, once started.
    pid: Option<u32>,
    ended: bool,
    #[cfg(windows)]
    job: Option<windows::JobObject>,
}

impl Scope {
    /// A scope with its own cgroup under `cgroup_base` where there is one, and the
    /// limits applied as far as this host allows.
    pub fn new(cgroup_base: Option<&Path>, limits: Limits) -> Self {
        let marker = format!("{:032x}", rand::random::<u128>());
        let mut notes = Vec::new();
        let cgroup = cgroup_base.and_then(|base| {
            let dir = base.join(format!("action-{}", &marker[..16]));
            match create_dir(&dir).and_then(|()| apply_cgroup_limits(&dir, limits)) {
                Ok(unapplied) => {
                    notes.extend(unapplied);
                    Some(dir)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the action runs without a cgroup");
                    let _ = std::fs::remove_dir(&dir);
                    None
                }
            }
        });
        // On Windows the Job Object carries both limits.
        if cgroup.is_none() && !cfg!(windows) {
            if let Some(bytes) = limits.max_memory_bytes {
                notes.push(if cfg!(target_os = "linux") {
                    format!(
                        "maxMemory {} applies to each process alone (RLIMIT_DATA): the agent has no cgroup memory controller",
                        human_bytes(bytes)
                    )
                } else {
                    format!("maxMemory {} is not enforced on this system", human_bytes(bytes))
                });
            }
            if limits.cpu_weight.is_some() {
                notes.push(
                    "cpuWeight is not enforced: the agent has no cgroup cpu controller".into(),
                );
            }
        }
        Self {
            marker,
            limits,
            cgroup,
            notes,
            pid: None,
            ended: false,
            #[cfg(windows)]
            job: None,
        }
    }

    /// Limits that apply in a weaker form than asked, for the action's message.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Sets up `command` so its process starts inside the scope: the marker variable,
    /// and (Linux) joining the cgroup or the per-process memory limit before `exec`.
    pub fn prepare(&self, command: &mut std::process::Command) -> std::io::Result<()> {
        command.env(MARKER_VAR, &self.marker);
        #[cfg(target_os = "linux")]
        {
            use std::io::Write;
            use std::os::unix::process::CommandExt;
            let mut procs = match &self.cgroup {
                Some(dir) => Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))?,
                ),
                None => None,
            };
            let data_limit = self
                .limits
                .max_memory_bytes
                .filter(|_| self.cgroup.is_none());
            // SAFETY: between fork and exec the closure makes only system calls
            // (write(2) on a file opened before the fork, setrlimit(2)); it allocates
            // nothing and takes no locks.
            unsafe {
                command.pre_exec(move || {
                    if let Some(procs) = procs.as_mut() {
                        procs.write_all(b"0")?;
                    }
                    if let Some(bytes) = data_limit {
                        nix::sys::resource::setrlimit(
                            nix::sys::resource::Resource::RLIMIT_DATA,
                            bytes,
                            bytes,
                        )
                        .map_err(std::io::Error::from)?;
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    }

    /// The action's first process started as `pid`: it is registered as a direct
    /// child, and (Windows) put in the action's Job Object. Returns what a restarted
    /// agent needs to end the action.
    pub fn started(&mut self, pid: u32) -> RunningRecord {
        self.pid = Some(pid);
        let mut children = CHILDREN.lock();
        children.pids.insert(pid);
        children.running += 1;
        drop(children);
        #[cfg(windows)]
        {
            self.job = match windows::JobObject::for_process(pid, self.limits) {
                Ok(job) => Some(job),
                Err(err) => {
                    self.notes.push(format!(
                        "the action runs without a Job Object ({err}): what it starts may outlive it"
                    ));
                    None
                }
            };
        }
        RunningRecord {
            pid,
            start_ticks: start_ticks(pid),
            marker: self.marker.clone(),
            cgroup: self.cgroup.clone(),
        }
    }

    /// Ends everything the action started and returns how it went.
    pub async fn end(mut self) -> Ending {
        tokio::task::spawn_blocking(move || self.finish())
            .await
            .unwrap_or_default()
    }

    fn finish(&mut self) -> Ending {
        self.ended = true;
        #[cfg(windows)]
        drop(self.job.take());
        let orphans = CHILDREN.lock().running == 1;
        let ending = end_all(self.pid, &self.marker, self.cgroup.as_deref(), orphans);
        if self.pid.is_some() {
            let mut children = CHILDREN.lock();
            if let Some(pid) = self.pid {
                children.pids.remove(&pid);
            }
            children.running = children.running.saturating_sub(1);
        }
        ending
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        // A scope dropped without `end` (the action's future was dropped when its job
        // was cancelled) still leaves nothing behind.
        if !self.ended {
            self.finish();
        }
    }
}

/// Writes the limits into an action's cgroup; returns the ones its controllers lack.
fn apply_cgroup_limits(dir: &Path, limits: Limits) -> Result<Vec<String>, String> {
    let mut unapplied = Vec::new();
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), value)
            .map_err(|err| format!("setting {}/{file}: {err}", dir.display()))
    };
    if let Some(bytes) = limits.max_memory_bytes {
        if dir.join("memory.max").exists() {
            write("memory.max", bytes.to_string())?;
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0".into())?;
            }
        } else {
            unapplied.push(format!(
                "maxMemory {} is not enforced: the agent's cgroup offers no memory controller",
                human_bytes(bytes)
            ));
        }
    }
    if let Some(weight) = limits.cpu_weight {
        if dir.join("cpu.weight").exists() {
            write("cpu.weight", weight.to_string())?;
        } else {
            unapplied.push(
                "cpuWeight is not enforced: the agent's cgroup offers no cpu controller".into(),
            );
        }
    }
    Ok(unapplied)
}

/// Ends what a crashed agent's action left running, from its record: its cgroup, the
/// processes carrying its marker, and its process group unless the pid was reused.
pub fn end_recorded(record: &RunningRecord) -> Ending {
    let group = match (start_ticks(record.pid), record.start_ticks) {
        // The leader lives on with another start time: the pid was reused.
        (Some(now), Some(then)) if now != then => None,
        _ => Some(record.pid),
    };
    end_all(group, &record.marker, record.cgroup.as_deref(), false)
}

/// Kills the cgroup, then every process in the group `group` or carrying `marker`
/// (and, with `orphans`, every process re-parented to this agent that it did not
/// start), round after round until a scan finds none; with `orphans`, reaps the zombies
/// it adopted; removes the cgroup.
fn end_all(group: Option<u32>, marker: &str, cgroup: Option<&Path>, orphans: bool) -> Ending {
    let mut ending = Ending::default();
    if let Some(dir) = cgroup {
        ending.out_of_memory = oom_kills(dir) > 0;
        if dir.exists()
            && let Err(err) = std::fs::write(dir.join("cgroup.kill"), "1")
        {
            tracing::warn!(cgroup = %dir.display(), error = %err, "cgroup.kill failed");
        }
    }
    #[cfg(target_os = "linux")]
    {
        let orphans = orphans && is_subreaper();
        let deadline = Instant::now() + Duration::from_secs(10);
        // A process keeps being found (and signalled) until it has died: count it once.
        let mut killed = BTreeSet::new();
        loop {
            let found = kill_matching(group, marker, orphans);
            if found.is_empty() || Instant::now() > deadline {
                break;
            }
            killed.extend(found);
            std::thread::sleep(Duration::from_millis(10));
        }
        ending.leftovers = killed.len();
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (group, marker, orphans);
    if let Some(dir) = cgroup {
        let deadline = Instant::now() + Duration::from_secs(5);
        while dir.exists() {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(err) if Instant::now() > deadline => {
                    tracing::warn!(cgroup = %dir.display(), error = %err, "cannot remove an action's cgroup");
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    ending
}

/// `oom_kill` of an action's `memory.events`.
fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.events"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// One process as `/proc/PID/stat` shows it.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    state: char,
    ppid: u32,
    pgrp: u32,
    start_ticks: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 3.. of stat(5): state, ppid, pgrp, ..., starttime is field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn stat_of(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn start_ticks(pid: u32) -> Option<u64> {
    stat_of(pid).map(|stat| stat.start_ticks)
}

/// Whether `environ` (NUL-separated, as in `/proc/PID/environ`) holds `MARKER_VAR=marker`.
fn carries_marker(environ: &[u8], marker: &str) -> bool {
    let wanted = format!("{MARKER_VAR}={marker}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// One scan of `/proc`: SIGKILLs every live process that belongs to the action, reaps
/// (with `orphans`) the zombies it adopted that tokio does not own, and returns those
/// it signalled.
#[cfg(target_os = "linux")]
fn kill_matching(group: Option<u32>, marker: &str, orphans: bool) -> Vec<u32> {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    use nix::unistd::Pid;
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let children = CHILDREN.lock();
    let ours = |pid: u32| children.pids.contains(&pid);
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(stat) = stat_of(pid) else { continue };
        if stat.state == 'Z' {
            // Only an orphan adopted as subreaper can be the action's; any other zombie
            // child is one that other code here (a concurrent run, a std Command) is
            // about to wait for, and reaping it would make that wait fail with ECHILD.
            if orphans && stat.ppid == me && !ours(pid) {
                let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
            }
            continue;
        }
        let belongs = group == Some(stat.pgrp)
            || (orphans && stat.ppid == me && !ours(pid))
            || std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| carries_marker(&environ, marker));
        if belongs && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
            killed.push(pid);
        }
    }
    killed
}

/// `134217728` as `128Mi`, for messages.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    UNITS
        .iter()
        .find(|(_, size)| bytes >= *size && bytes.is_multiple_of(*size))
        .map(|(unit, size)| format!("{}{unit}", bytes / size))
        .unwrap_or_else(|| bytes.to_string())
}

/// Windows: a Job Object per action, killing every process in it when closed.
pub mod job_limits {
    use super::Limits;

    /// What the action's Job Object is set to: always kill-on-close; the memory limit
    /// for the whole job; the CPU weight on Windows' 1–9 scale.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct JobSettings {
        pub kill_on_close: bool,
        pub job_memory: Option<u64>,
        pub cpu_weight: Option<u32>,
    }

    /// Maps cgroup v2's weight (1–10000, default 100) onto a Job Object's weight
    /// (1–9, default 5) so that the defaults meet and the order is kept.
    pub fn windows_weight(cgroup_weight: u32) -> u32 {
        let weight = cgroup_weight.clamp(1, 10_000);
        if weight == 100 {
            5
        } else if weight < 100 {
            // 1..99 onto 1..4
            1 + (weight - 1) * 4 / 99
        } else {
            // 101..10000 onto 6..9
            6 + (weight - 101) * 4 / 9_900
        }
        .min(9)
    }

    pub fn settings(limits: Limits) -> JobSettings {
        JobSettings {
            kill_on_close: true,
            job_memory: limits.max_memory_bytes,
            cpu_weight: limits.cpu_weight.map(windows_weight),
        }
    }
}

#[cfg(windows)]
mod windows {
    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JOB_OBJECT_CPU_RATE_CONTROL_ENABLE,
        JOB_OBJECT_CPU_RATE_CONTROL_WEIGHT_BASED, JOB_OBJECT_LIMIT_JOB_MEMORY,
        JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, JOBOBJECT_CPU_RATE_CONTROL_INFORMATION,
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JobObjectCpuRateControlInformation,
        JobObjectExtendedLimitInformation, SetInformationJobObject, TerminateJobObject,
    };
    use windows_sys::Win32::System::Threading::{
        OpenProcess, PROCESS_SET_QUOTA, PROCESS_TERMINATE,
    };

    use super::Limits;
    use super::job_limits::settings;

    /// A Job Object holding an action's processes; dropping it kills them all.
    pub struct JobObject(HANDLE);

    // SAFETY: a job handle may be used and closed from any thread.
    unsafe impl Send for JobObject {}
    unsafe impl Sync for JobObject {}

    impl JobObject {
        pub fn for_process(pid: u32, limits: Limits) -> std::io::Result<Self> {
            let wanted = settings(limits);
            // SAFETY: plain Win32 calls on handles this function owns; every
            // structure passed is fully initialised and outlives the call.
            unsafe {
                let job = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if job.is_null() {
                    return Err(std::io::Error::last_os_error());
                }
                let job = JobObject(job);
                let mut info: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
                info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
                if let Some(bytes) = wanted.job_memory {
                    info.BasicLimitInformation.LimitFlags |= JOB_OBJECT_LIMIT_JOB_MEMORY;
                    info.JobMemoryLimit = usize::try_from(bytes).unwrap_or(usize::MAX);
                }
                if SetInformationJobObject(
                    job.0,
                    JobObjectExtendedLimitInformation,
                    (&raw const info).cast(),
                    std::mem::size_of_val(&info) as u32,
                ) == 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(weight) = wanted.cpu_weight {
                    let mut rate: JOBOBJECT_CPU_RATE_CONTROL_INFORMATION = std::mem::zeroed();
                    rate.ControlFlags = JOB_OBJECT_CPU_RATE_CONTROL_ENABLE
                        | JOB_OBJECT_CPU_RATE_CONTROL_WEIGHT_BASED;
                    rate.Anonymous.Weight = weight;
                    // A weight the system refuses leaves the action unweighted.
                    let _ = SetInformationJobObject(
                        job.0,
                        JobObjectCpuRateControlInformation,
                        (&raw const rate).cast(),
                        std::mem::size_of_val(&rate) as u32,
                    );
                }
                let process = OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, 0, pid);
                if process.is_null() {
                    return Err(std::io::Error::last_os_error());
                }
                let assigned = AssignProcessToJobObject(job.0, process);
                CloseHandle(process);
                if assigned == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(job)
            }
        }
    }

    impl Drop for JobObject {
        fn drop(&mut self) {
            // SAFETY: the handle is this object's own and is closed once.
            unsafe {
                TerminateJobObject(self.0, 1);
                CloseHandle(self.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::job_limits::{settings, windows_weight};
    use super::*;

    /// A process that is not a subreaper adopts no orphans: a zombie child of it is
    /// someone else's to wait for, also while an action ends.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn ending_an_action_leaves_other_code_its_exited_children() {
        assert!(!is_subreaper(), "the test process adopts no orphans");
        let mut other = std::process::Command::new("true").spawn().unwrap();
        let pid = other.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while stat_of(pid).is_some_and(|stat| stat.state != 'Z') {
            assert!(Instant::now() < deadline, "true did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = crate::agent::process::run(&crate::agent::process::ProcessSpec {
            program: "true".into(),
            timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(outcome.end, crate::agent::process::ProcessEnd::Exited(0));
        let status = other
            .wait()
            .expect("the exited child is still there to be waited for");
        assert!(status.success());
    }

    #[test]
    fn stat_lines_are_read_after_the_command_name() {
        let line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                start_ticks: 987654
            })
        );
        assert_eq!(parse_stat("4242 (sh"), None);
    }

    #[test]
    fn only_the_exact_marker_matches() {
        let environ = b"PATH=/bin\0FLEETPATCH_ACTION_ID=abc\0HOME=/root\0";
        assert!(carries_marker(environ, "abc"));
        assert!(!carries_marker(environ, "ab"));
        assert!(!carries_marker(b"FLEETPATCH_ACTION_ID=abcd\0", "abc"));
        assert!(!carries_marker(b"X_FLEETPATCH_ACTION_ID=abc\0", "abc"));
    }

    #[test]
    fn job_object_weights_keep_the_default_and_the_order() {
        assert_eq!(windows_weight(100), 5);
        assert_eq!(windows_weight(1), 1);
        assert_eq!(windows_weight(10_000), 9);
        assert_eq!(windows_weight(0), 1);
        assert_eq!(windows_weight(50_000), 9);
        let weights: Vec<u32> = (1..=10_000).step_by(7).map(windows_weight).collect();
        assert!(weights.windows(2).all(|w| w[0] <= w[1]));
        assert!(weights.iter().all(|w| (1..=9).contains(w)));
        assert!(windows_weight(99) < 5 && windows_weight(101) > 5);
        let job = settings(Limits {
            max_memory_bytes: Some(64 << 20),
            cpu_weight: Some(200),
        });
        assert!(job.kill_on_close);
        assert_eq!(job.job_memory, Some(64 << 20));
        assert_eq!(job.cpu_weight, Some(6));
        assert!(settings(Limits::default()).kill_on_close);
    }

    #[test]
    fn byte_counts_read_as_quantities() {
        assert_eq!(human_bytes(128 << 20), "128Mi");
        assert_eq!(human_bytes(3 << 30), "3Gi");
        assert_eq!(human_bytes(1000), "1000");
    }

    #[test]
    fn a_record_survives_the_journal() {
        let record = RunningRecord {
            pid: 7,
            start_ticks: Some(12),
            marker: "m".into(),
            cgroup: Some("/sys/fs/cgroup/x".into()),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(
            serde_json::from_str::<RunningRecord>(&text).unwrap(),
            record
        );
    }
}
