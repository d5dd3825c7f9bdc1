//! The agent: runs PatchJobs on a host. The executor walks a job's pre actions,
//! patches, post actions and single reboot with the seeds' semantics, journaling every
//! step so a crash or a reboot resumes where it stopped.

pub mod containment;
pub mod download;
pub mod executor;
pub mod journal;
pub mod local;
pub mod outcome;
pub mod patcher;
pub mod powershell;
pub mod process;
pub mod reboot;
pub mod remote;
pub mod script;

/// The flags `agent exec` and `agent run` share: where actions are contained, and the
/// knobs demos and tests use for reboots and timeouts.
#[derive(Clone, Debug, clap::Args)]
pub struct HostOptions {
    /// A cgroup v2 directory the agent may manage: each action gets its own cgroup
    /// under it (ended with `cgroup.kill`, carrying the Task's limits). Without it the
    /// agent uses its own cgroup when systemd delegated it (`Delegate=yes`).
    #[arg(long, value_name = "DIR")]
    pub action_cgroup: Option<std::path::PathBuf>,
    /// Never reboot the host for real: a reboot the agent may make only bumps a boot
    /// counter in the state directory and the command exits with status 3, as if the
    /// host went down; running it again finishes the job. For demos and tests.
    #[arg(long)]
    pub simulate_reboot: bool,
    /// Length of one timeout minute in milliseconds (for tests).
    #[arg(long, hide = true, default_value_t = 60_000)]
    pub minute_ms: u64,
}
