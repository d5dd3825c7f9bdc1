//! `fleetpatch agent exec`: resolve a workflow from manifest files and run it on this
//! host, without any cluster. An unfinished job of the same workflow in the state
//! directory is resumed instead of started again.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::patchjob::{ActionPhase, JobPhase, PatchJobSpec, PatchJobStatus};
use crate::api::plan::{PatchClassification, PatchSelection, RebootPolicy};
use crate::api::resolve::{self, JobTarget};
use crate::manifests;

use super::executor::{self, Event, Executor, RunOutcome, Stage};
use super::journal::{JobRecord, Journal};
use super::patcher;
use super::reboot::{HostRebooter, Rebooter, SimulatedRebooter};

/// Exit status when the host is rebooting in the middle of the job.
pub const EXIT_REBOOTING: u8 = 3;

/// Why `agent exec` did not reboot, and how to let it.
const EXEC_REBOOT_REFUSAL: &str = "`agent exec` reboots this host only with --allow-reboot";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PatchChoice {
    /// Run only the workflow's actions.
    None,
    /// Security and critical updates.
    Security,
    /// Every available update.
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RebootChoice {
    Never,
    IfRequired,
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Options of `agent exec`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecOptions {
    /// Files or directories of manifests holding the workflow, its tasks and scripts.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
    /// Name of the Workflow to run.
    #[arg(long)]
    pub workflow: String,
    /// Namespace of the workflow (objects without a namespace are in "default").
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Namespace of the built-in library.
    #[arg(long, default_value = crate::api::rules::DEFAULT_LIBRARY_NAMESPACE)]
    pub library_namespace: String,
    /// Which patches to install between the pre and post actions.
    #[arg(long, value_enum, default_value = "none")]
    pub patches: PatchChoice,
    /// Whether the job may reboot the host.
    #[arg(long, value_enum, default_value = "if-required")]
    pub reboot: RebootChoice,
    /// Where the journal, scripts and downloads are kept.
    #[arg(long, default_value = "/var/lib/fleetpatch")]
    pub state_dir: PathBuf,
    /// `text` prints each action as it starts and ends; `json` prints the final PatchJob status.
    #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Let the job reboot this host when it needs to (a script exits 10 or 11, the
    /// patches want it, or the workflow's Reboot task runs). Without it a required reboot
    /// is reported `RequiredNotPerformed` and nothing reboots.
    #[arg(long)]
    pub allow_reboot: bool,
    #[command(flatten)]
    pub host: super::HostOptions,
}

fn selection(choice: PatchChoice) -> PatchSelection {
    match choice {
        PatchChoice::None => PatchSelection {
            skip: true,
            ..PatchSelection::default()
        },
        PatchChoice::Security => PatchSelection::default(),
        PatchChoice::All => PatchSelection {
            classifications: vec![PatchClassification::All],
            ..PatchSelection::default()
        },
    }
}

fn reboot_policy(choice: RebootChoice) -> RebootPolicy {
    match choice {
        RebootChoice::Never => RebootPolicy::Never,
        RebootChoice::IfRequired => RebootPolicy::IfRequired,
        RebootChoice::Always => RebootPolicy::Always,
    }
}

/// Runs `agent exec`; returns the process exit status.
pub async fn exec(options: ExecOptions) -> anyhow::Result<u8> {
    super::containment::start_agent(options.host.action_cgroup.as_deref())
        .map_err(|why| anyhow::anyhow!("--action-cgroup: {why}"))?;
    let journal = Journal::open(&options.state_dir)?;
    // Windows: SYSTEM and Administrators only (scripts there run as SYSTEM).
    super::process::protect_state_dir(&options.state_dir)?;
    let id = format!("local-{}-{}", options.namespace, options.workflow);
    let mut record = match journal.load(&id)? {
        Some(record) if !record.is_finished() => {
            eprintln!(
                "resuming unfinished job {id} from {}",
                options.state_dir.display()
            );
            record
        }
        _ => {
            let record = executor::new_record(
                id.clone(),
                format!("{}/{}", options.namespace, options.workflow),
                resolve_local_job(&options)?,
            );
            journal.save(&record)?;
            record
        }
    };

    let host_rebooter = HostRebooter;
    let simulated = SimulatedRebooter {
        counter_file: options.state_dir.join("simulated-boot-id"),
    };
    let rebooter: &dyn Rebooter = if options.host.simulate_reboot {
        &simulated
    } else {
        &host_rebooter
    };
    let detected = if record.spec.patches.skip {
        None
    } else {
        patcher::detect()
    };
    let text = options.output == OutputFormat::Text;
    if text {
        println!(
            "job {}: workflow {}, {} pre and {} post action(s)",
            record.id,
            record.name,
            record.spec.pre_actions.len(),
            record.spec.post_actions.len()
        );
    }
    let on_event = move |record: &JobRecord, event: &Event| {
        if text {
            print_event(record, event);
        }
    };
    let executor = Executor {
        journal: &journal,
        work_dir: options.state_dir.join("work"),
        patcher: detected.as_deref(),
        rebooter,
        minute: Duration::from_millis(options.host.minute_ms),
        max_download_bytes: super::download::DEFAULT_MAX_BYTES,
        on_event: &on_event,
        reboot_gate: None,
        cancel: None,
        reboot_refusal: (!options.allow_reboot).then_some(EXEC_REBOOT_REFUSAL),
    };
    let outcome = executor.run(&mut record).await?;
    match options.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&record.status)?),
        OutputFormat::Text => print_summary(&record.status, &outcome),
    }
    Ok(match (outcome, record.status.phase) {
        (RunOutcome::Rebooting, _) => EXIT_REBOOTING,
        (_, JobPhase::Succeeded) => 0,
        _ => 1,
    })
}

/// The job the manifests describe for this host: checked as `fleetpatch validate`
/// checks them (nothing runs when they have a problem), then resolved from the named
/// workflow.
fn resolve_local_job(options: &ExecOptions) -> anyhow::Result<PatchJobSpec> {
    let documents = manifests::load(&options.paths)?;
    let check_options = manifests::CheckOptions {
        library_namespace: options.library_namespace.clone(),
        default_namespace: options.namespace.clone(),
        // The run refuses what this host's patcher cannot install.
        patchers: Vec::new(),
    };
    let report = manifests::check(&documents, &manifests::Schemas::new(), &check_options);
    if !report.problems.is_empty() {
        for problem in &report.problems {
            eprintln!("{problem}");
        }
        anyhow::bail!(
            "the manifests have {} problem(s); nothing was run",
            report.problems.len()
        );
    }
    let target = JobTarget {
        agent: hostname(),
        plan: String::new(),
        run: String::new(),
        patches: selection(options.patches),
        reboot: reboot_policy(options.reboot),
    };
    Ok(resolve::resolve_named(
        &report.catalog,
        &options.namespace,
        &options.workflow,
        target,
    )?)
}

/// This host's name.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("COMPUTERNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

fn first_line(text: &str) -> &str {
    text.lines()
        .find(|l| !l.trim().is_empty() && *l != "…")
        .unwrap_or("")
}

fn print_event(record: &JobRecord, event: &Event) {
    let status = &record.status;
    let line = match event {
        Event::ActionStarted { stage, index } => {
            let list = if *stage == Stage::Pre {
                &status.pre_actions
            } else {
                &status.post_actions
            };
            format!(
                "{:<4} {}/{} {:<32} running",
                stage.as_str(),
                index + 1,
                list.len(),
                list[*index].name
            )
        }
        Event::ActionFinished { stage, index } => {
            let list = if *stage == Stage::Pre {
                &status.pre_actions
            } else {
                &status.post_actions
            };
            let result = &list[*index];
            let exit = result
                .exit_code
                .map(|c| format!(" exit {c}"))
                .unwrap_or_default();
            let reboot = if result.reboot_requested {
                " (reboot requested)"
            } else {
                ""
            };
            let detail = match result.phase {
                ActionPhase::Succeeded => String::new(),
                _ => format!(": {}", first_line(&result.message)),
            };
            format!(
                "{:<4} {}/{} {:<32} {:?}{exit}{reboot}{detail}",
                stage.as_str(),
                index + 1,
                list.len(),
                result.name,
                result.phase
            )
        }
        Event::PatchesStarted => "patches running".to_string(),
        Event::PatchesFinished => {
            let patches = status.patches.clone().unwrap_or_default();
            format!(
                "patches {:?}: {}",
                patches.phase,
                first_line(&patches.message)
            )
        }
        Event::RebootStarted => {
            let by = status
                .reboot
                .as_ref()
                .and_then(|r| r.requested_by.clone())
                .unwrap_or_default();
            format!("reboot  starting (requested by {by})")
        }
        Event::RebootCompleted => "reboot  completed: the host is back".to_string(),
        Event::RebootRequested => "reboot  waiting for permission".to_string(),
        Event::RebootRefused => format!("reboot  required: {}", status.message),
        Event::JobStarted | Event::JobFinished => return,
    };
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn print_summary(status: &PatchJobStatus, outcome: &RunOutcome) {
    if *outcome == RunOutcome::Rebooting {
        println!(
            "the host is rebooting; run the same command again after the reboot to finish the job"
        );
        return;
    }
    let reboot = status
        .reboot
        .as_ref()
        .map(|r| format!("{:?}", r.state))
        .unwrap_or_else(|| "NotRequired".into());
    println!(
        "job {:?}: {} (actions {}, reboot {reboot})",
        status.phase,
        status.message,
        status.progress.as_deref().unwrap_or("0/0")
    );
}
