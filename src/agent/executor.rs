//! The executor: walks one job — pre actions, patches, post actions, the single
//! reboot — with the seeds' semantics, and journals every step before and after it
//! runs. Where it stands is derived from the job's status alone, so a restarted agent
//! resumes from the journal: an action found `Running` was cut off by a crash and is
//! reported `Interrupted`, never run again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::conditions;
use crate::api::patchjob::{
    ActionPhase, ActionResult, JobPhase, PatchJobSpec, PatchJobStatus, PatchResults, RebootRecord,
    RebootState, ResolvedAction, ResolvedScript,
};
use crate::api::plan::RebootPolicy;
use crate::api::task::TaskType;
use crate::api::workflow::{PostFailurePolicy, PreFailurePolicy};

use super::containment;
use super::download;
use super::journal::{JobRecord, Journal, JournalError};
use super::outcome::{ExitOutcome, detection_says_install};
use super::patcher::Patcher;
use super::powershell;
use super::process::{self, ProcessEnd, ProcessSpec};
use super::reboot::Rebooter;
use super::script::{self, ScriptRun};

/// Files in the job directory recording the running action (see
/// [`containment::RunningRecord`]) and the boot it started in.
/// Where the record of the running action of the job whose working directory is
/// `job_dir` is kept: next to that directory, not in it, so a script that empties its
/// working directory does not erase what a restarted agent needs to end what it left.
fn running_file(job_dir: &std::path::Path) -> PathBuf {
    job_dir.with_extension("running.json")
}
const RUNNING_BOOT_FILE: &str = "running.boot";

/// Environment variable holding the verified installer's path for install scripts.
pub const DOWNLOAD_PATH_VAR: &str = "FLEETPATCH_DOWNLOAD_PATH";

/// Which list an action is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Pre,
    Post,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pre => "pre",
            Self::Post => "post",
        }
    }
}

/// Something a person or the gateway wants to hear about.
#[derive(Clone, Debug)]
pub enum Event {
    JobStarted,
    ActionStarted {
        stage: Stage,
        index: usize,
    },
    ActionFinished {
        stage: Stage,
        index: usize,
    },
    PatchesStarted,
    PatchesFinished,
    /// A node agent asked the controller to drain the node before the reboot.
    RebootRequested,
    RebootStarted,
    RebootCompleted,
    /// A reboot was due but this agent may not reboot its host.
    RebootRefused,
    JobFinished,
}

/// How a call to [`Executor::run`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The job reached Succeeded or Failed.
    Finished,
    /// The host is rebooting; the job continues when the agent starts again.
    Rebooting,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Settings of one executor.
pub struct Executor<'a> {
    pub journal: &'a Journal,
    /// Scripts and downloads go under `work_dir/<job id>/`.
    pub work_dir: PathBuf,
    pub patcher: Option<&'a dyn Patcher>,
    pub rebooter: &'a dyn Rebooter,
    /// Length of one "minute" of action timeouts. Real runs use 60 s; tests shorten it.
    pub minute: Duration,
    /// Largest installer accepted.
    pub max_download_bytes: u64,
    /// Called after every journaled change.
    pub on_event: &'a (dyn Fn(&JobRecord, &Event) + Send + Sync),
    /// Asked before every reboot when set (node agents: the controller drains the node).
    pub reboot_gate: Option<&'a dyn RebootGate>,
    /// Set when the job must stop (it was deleted, or the agent paused).
    pub cancel: Option<&'a Cancellation>,
    /// Why this agent never reboots its host, saying how to allow it (it was started
    /// without `--allow-reboot`): a reboot the job needs is then reported
    /// `RequiredNotPerformed` with this reason, and the job goes on as under the reboot
    /// policy Never.
    pub reboot_refusal: Option<&'a str>,
}

/// A request to stop a job: the running action is killed and reported Interrupted,
/// nothing further runs, and no reboot follows.
#[derive(Default)]
pub struct Cancellation {
    reason: parking_lot::Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Cancellation {
    pub fn cancel(&self, reason: impl Into<String>) {
        let mut current = self.reason.lock();
        if current.is_none() {
            *current = Some(reason.into());
        }
        drop(current);
        self.notify.notify_waiters();
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }

    /// Resolves once the job is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// Whether the host may reboot now. A node agent asks the controller, which cordons and
/// drains the node first; `Err` carries why the reboot is called off.
pub trait RebootGate: Send + Sync {
    fn permit<'a>(
        &'a self,
        record: &'a JobRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// The operating system this agent runs on, in words: the distribution and version from
/// os-release where there is one.
fn host_os() -> String {
    let text = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|file| std::fs::read_to_string(file).ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|name| name.trim_matches('"').to_string())
        .unwrap_or_else(|| std::env::consts::OS.to_string())
}

fn is_failure(phase: ActionPhase) -> bool {
    matches!(
        phase,
        ActionPhase::Failed | ActionPhase::TimedOut | ActionPhase::Interrupted
    )
}

/// Ends the action that was running when the reboot began (a Reboot task), if any.
fn end_running_actions(status: &mut PatchJobStatus, phase: ActionPhase, message: &str) {
    for result in status
        .pre_actions
        .iter_mut()
        .chain(status.post_actions.iter_mut())
        .filter(|result| result.phase == ActionPhase::Running)
    {
        result.phase = phase;
        result.finish_time = Some(Time(now()));
        result.message = message.to_string();
    }
}

/// A fresh record for `spec`: every action Pending.
pub fn new_record(id: impl Into<String>, name: impl Into<String>, spec: PatchJobSpec) -> JobRecord {
    let pending = |actions: &[ResolvedAction]| {
        actions
            .iter()
            .map(|a| ActionResult {
                name: a.name.clone(),
                ..ActionResult::default()
            })
            .collect::<Vec<_>>()
    };
    let status = PatchJobStatus {
        phase: JobPhase::Pending,
        pre_actions: pending(&spec.pre_actions),
        post_actions: pending(&spec.post_actions),
        ..PatchJobStatus::default()
    };
    let mut record = JobRecord {
        id: id.into(),
        name: name.into(),
        spec,
        status,
        boot_id_at_reboot: None,
        sequence: 0,
        acknowledged_sequence: 0,
    };
    update_progress(&mut record.status);
    record
}

fn update_progress(status: &mut PatchJobStatus) {
    let actions = status.pre_actions.iter().chain(&status.post_actions);
    let total = status.pre_actions.len() + status.post_actions.len();
    let done = actions.filter(|a| a.phase.is_finished()).count();
    status.progress = Some(format!("{done}/{total}"));
}

/// The next thing to do for a job, derived from its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Action(Stage, usize),
    Patches,
    ResumeReboot,
    /// Waiting for permission to reboot (the agent restarted while it waited).
    AwaitReboot,
    FinalReboot,
    Finish,
    Done,
}

/// The next thing to do for `record`, from its status alone (so a journal read back
/// after a crash says where to resume). Never fails, whatever the record holds.
pub fn next_step(record: &JobRecord) -> Step {
    let status = &record.status;
    if status.phase.is_finished() {
        return Step::Done;
    }
    if status
        .reboot
        .as_ref()
        .is_some_and(|r| r.state == RebootState::InProgress)
    {
        return Step::ResumeReboot;
    }
    if status
        .reboot
        .as_ref()
        .is_some_and(|r| r.state == RebootState::Pending)
    {
        return Step::AwaitReboot;
    }
    // A Reboot task in the pre list waits until the patches are installed.
    let pre = status
        .pre_actions
        .iter()
        .zip(&record.spec.pre_actions)
        .position(|(result, action)| {
            !result.phase.is_finished() && action.action_type != TaskType::Reboot
        });
    if let Some(index) = pre {
        return Step::Action(Stage::Pre, index);
    }
    if status
        .patches
        .as_ref()
        .is_none_or(|p| !p.phase.is_finished())
    {
        return Step::Patches;
    }
    if let Some(index) = status
        .post_actions
        .iter()
        .zip(&record.spec.post_actions)
        .position(|(result, _)| !result.phase.is_finished())
    {
        return Step::Action(Stage::Post, index);
    }
    if status.reboot.is_none() {
        return Step::FinalReboot;
    }
    Step::Finish
}

/// Who asked for a reboot so far: the first action or the patch step.
fn reboot_requester(status: &PatchJobStatus) -> Option<String> {
    status
        .pre_actions
        .iter()
        .find(|a| a.reboot_requested)
        .map(|a| a.name.clone())
        .or_else(|| {
            status
                .patches
                .as_ref()
                .filter(|p| p.reboot_required)
                .map(|_| "patches".to_string())
        })
        .or_else(|| {
            status
                .post_actions
                .iter()
                .find(|a| a.reboot_requested)
                .map(|a| a.name.clone())
        })
}

impl Executor<'_> {
    fn save(&self, record: &mut JobRecord, event: Event) -> Result<(), ExecError> {
        record.sequence += 1;
        update_progress(&mut record.status);
        self.journal.save(record)?;
        (self.on_event)(record, &event);
        Ok(())
    }

    fn job_dir(&self, record: &JobRecord) -> PathBuf {
        let safe: String = record
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.work_dir.join(safe)
    }

    /// Runs (or resumes) the job until it finishes or the host reboots.
    pub async fn run(&self, record: &mut JobRecord) -> Result<RunOutcome, ExecError> {
        if record.status.phase == JobPhase::Pending {
            record.status.phase = JobPhase::Running;
            record.status.start_time = Some(Time(now()));
            self.save(record, Event::JobStarted)?;
        }
        loop {
            if let Some(reason) = self.cancel.and_then(Cancellation::reason)
                && !record.status.phase.is_finished()
            {
                self.stop(record, &reason)?;
                return Ok(RunOutcome::Finished);
            }
            match next_step(record) {
                Step::Done => return Ok(RunOutcome::Finished),
                Step::Action(stage, index) => {
                    if let Some(outcome) = self.step_action(record, stage, index).await? {
                        return Ok(outcome);
                    }
                }
                Step::Patches => self.step_patches(record).await?,
                Step::ResumeReboot => self.resume_reboot(record)?,
                Step::AwaitReboot => {
                    let requester = record
                        .status
                        .reboot
                        .as_ref()
                        .and_then(|r| r.requested_by.clone())
                        .unwrap_or_else(|| "policy".into());
                    if let Some(outcome) = self.start_reboot(record, requester).await? {
                        return Ok(outcome);
                    }
                }
                Step::FinalReboot => {
                    if let Some(outcome) = self.final_reboot(record).await? {
                        return Ok(outcome);
                    }
                }
                Step::Finish => {
                    self.finish(record)?;
                    return Ok(RunOutcome::Finished);
                }
            }
        }
    }

    fn actions(
        record: &mut JobRecord,
        stage: Stage,
    ) -> (&[ResolvedAction], &mut Vec<ActionResult>) {
        match stage {
            Stage::Pre => (&record.spec.pre_actions, &mut record.status.pre_actions),
            Stage::Post => (&record.spec.post_actions, &mut record.status.post_actions),
        }
    }

    /// Whether the failure policy says this action must not run, and why.
    fn blocked(record: &JobRecord, stage: Stage, index: usize) -> Option<String> {
        let status = &record.status;
        let policy = &record.spec.failure_policy;
        match stage {
            Stage::Pre => {
                let failed = status.pre_actions[..index]
                    .iter()
                    .find(|a| is_failure(a.phase));
                match (policy.pre, failed) {
                    (PreFailurePolicy::AbortPatching, Some(failed)) => {
                        Some(format!("not run: pre-patching task {} failed", failed.name))
                    }
                    _ => None,
                }
            }
            Stage::Post => {
                let patches = status.patches.as_ref();
                let patch_failed = patches.is_some_and(|p| {
                    matches!(
                        p.phase,
                        ActionPhase::Failed | ActionPhase::TimedOut | ActionPhase::NotRun
                    )
                });
                if patch_failed && !policy.run_post_tasks_after_patch_failure {
                    return Some("not run: patching failed or was skipped, and post tasks do not run after that".into());
                }
                let failed = status.post_actions[..index]
                    .iter()
                    .find(|a| is_failure(a.phase));
                match (policy.post, failed) {
                    (PostFailurePolicy::StopRemaining, Some(failed)) => Some(format!(
                        "not run: post-patching task {} failed",
                        failed.name
                    )),
                    _ => None,
                }
            }
        }
    }

    async fn step_action(
        &self,
        record: &mut JobRecord,
        stage: Stage,
        index: usize,
    ) -> Result<Option<RunOutcome>, ExecError> {
        let current = Self::actions(record, stage).1[index].phase;
        if current == ActionPhase::Running {
            // The agent died while this action ran. Running it again could do harm twice;
            // whatever it left running in this boot is stopped.
            let job_dir = self.job_dir(record);
            let recorded_boot = std::fs::read_to_string(job_dir.join(RUNNING_BOOT_FILE)).ok();
            if recorded_boot.is_some() && recorded_boot == self.rebooter.boot_id() {
                process::end_recorded_action(&running_file(&job_dir));
            }
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::Interrupted;
            result.finish_time = Some(Time(now()));
            result.message =
                "interrupted: the agent stopped while this action ran; it was not run again".into();
            self.save(record, Event::ActionFinished { stage, index })?;
            return Ok(None);
        }
        if let Some(reason) = Self::blocked(record, stage, index) {
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::NotRun;
            result.message = reason;
            self.save(record, Event::ActionFinished { stage, index })?;
            return Ok(None);
        }
        let action = Self::actions(record, stage).0[index].clone();
        if action.action_type == TaskType::Reboot {
            return self.reboot_action(record, stage, index).await;
        }
        {
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::Running;
            result.start_time = Some(Time(now()));
        }
        self.save(record, Event::ActionStarted { stage, index })?;
        let job_dir = self.job_dir(record);
        let stem = format!("{}-{index}", stage.as_str());
        let mut env = action.parameters.clone();
        env.insert("FLEETPATCH_JOB".into(), record.name.clone());
        env.insert("FLEETPATCH_ACTION".into(), action.name.clone());
        env.insert("FLEETPATCH_STAGE".into(), stage.as_str().into());
        if let Some(boot_id) = self.rebooter.boot_id() {
            let _ = std::fs::create_dir_all(&job_dir)
                .and_then(|()| std::fs::write(job_dir.join(RUNNING_BOOT_FILE), boot_id));
        }
        let perform = self.perform(&action, &job_dir, &stem, env);
        let finished = match self.cancel {
            None => perform.await,
            Some(cancel) => tokio::select! {
                finished = perform => finished,
                () = cancel.cancelled() => {
                    // What the action started is stopped with it.
                    process::end_recorded_action(&running_file(&job_dir));
                    Finished {
                        phase: ActionPhase::Interrupted,
                        exit_code: None,
                        reboot_requested: false,
                        message: format!("cancelled: {}", cancel.reason().unwrap_or_default()),
                    }
                }
            },
        };
        let result = &mut Self::actions(record, stage).1[index];
        result.phase = finished.phase;
        result.exit_code = finished.exit_code;
        result.reboot_requested = finished.reboot_requested;
        result.message = finished.message;
        result.finish_time = Some(Time(now()));
        self.save(record, Event::ActionFinished { stage, index })?;
        Ok(None)
    }

    /// Runs one non-reboot action to its result.
    async fn perform(
        &self,
        action: &ResolvedAction,
        job_dir: &std::path::Path,
        stem: &str,
        env: BTreeMap<String, String>,
    ) -> Finished {
        let run = ActionRun {
            action,
            job_dir,
            stem,
            deadline: Instant::now() + self.minute * action.timeout_minutes,
            timeout_message: format!(
                "timed out after {} minute(s); the action was killed",
                action.timeout_minutes
            ),
        };
        match action.action_type {
            TaskType::RunScript => {
                let Some(script) = &action.script else {
                    return Finished::failed("the action has no script");
                };
                self.run_script(&run, script, env).await
            }
            TaskType::InstallSoftware => self.install_software(&run, env).await,
            TaskType::ChangeRegistryKey | TaskType::UninstallSoftware => {
                self.run_windows_setting(&run).await
            }
            TaskType::Reboot => unreachable!("reboot actions are handled by reboot_action"),
        }
    }

    /// Runs the action's main script with `env` and classifies its exit.
    async fn run_script(
        &self,
        run: &ActionRun<'_>,
        script: &ResolvedScript,
        env: BTreeMap<String, String>,
    ) -> Finished {
        let script_run = ScriptRun {
            script,
            stem: run.stem.into(),
            env,
            bypass_execution_policy: run.action.bypass_execution_policy,
            timeout: run.remaining(),
        };
        match script::prepare(&script_run, run.job_dir) {
            Ok(spec) => {
                self.run_classified(&spec, run.action, &run.timeout_message)
                    .await
            }
            Err(err) => Finished::failed(err.to_string()),
        }
    }

    /// Detection (when the action has a detection script), download, then the
    /// installer with the download's path in its environment.
    async fn install_software(
        &self,
        run: &ActionRun<'_>,
        mut env: BTreeMap<String, String>,
    ) -> Finished {
        let action = run.action;
        let (Some(installer), Some(download)) = (&action.script, &action.download) else {
            return Finished::failed("the action has no install script or download");
        };
        if let Some(detection) = &action.detection_script
            && let Some(not_installing) = self.detect(run, detection, &env).await
        {
            return not_installing;
        }
        let downloads = run.job_dir.join("downloads");
        let fetched = match tokio::time::timeout(
            run.remaining(),
            download::fetch(download, &downloads, self.max_download_bytes),
        )
        .await
        {
            Err(_) => {
                return Finished::timed_out(
                    format!("download {}", run.timeout_message),
                    String::new(),
                );
            }
            Ok(Err(err)) => return Finished::failed(err.to_string()),
            Ok(Ok(fetched)) => fetched,
        };
        env.insert(DOWNLOAD_PATH_VAR.into(), fetched.path.display().to_string());
        env.insert(
            "FLEETPATCH_DOWNLOAD_DIR".into(),
            downloads.display().to_string(),
        );
        self.run_script(run, installer, env).await
    }

    /// Runs the detection script; `None` when it says to install, else the action's
    /// result without installing.
    async fn detect(
        &self,
        run: &ActionRun<'_>,
        detection: &ResolvedScript,
        env: &BTreeMap<String, String>,
    ) -> Option<Finished> {
        let script_run = ScriptRun {
            script: detection,
            stem: format!("{}-detect", run.stem),
            env: env.clone(),
            bypass_execution_policy: run.action.bypass_execution_policy,
            timeout: run.remaining(),
        };
        let spec = match script::prepare(&script_run, run.job_dir) {
            Ok(spec) => spec,
            Err(err) => return Some(Finished::failed(format!("detection script: {err}"))),
        };
        let spec = ProcessSpec {
            running_file: Some(running_file(run.job_dir)),
            limits: run.action.limits.unwrap_or_default(),
            ..spec
        };
        match process::run(&spec).await {
            Err(err) => Some(Finished::failed(format!("detection script: {err}"))),
            Ok(outcome) => {
                detection_verdict(outcome.end, outcome.output_tail, &run.timeout_message)
            }
        }
    }

    /// ChangeRegistryKey and UninstallSoftware: generated PowerShell, Windows only.
    async fn run_windows_setting(&self, run: &ActionRun<'_>) -> Finished {
        let action = run.action;
        if !cfg!(windows) {
            return Finished::failed(format!(
                "{} requires Windows; this host runs {}",
                action.action_type,
                host_os()
            ));
        }
        let code = match (&action.change_registry_key, &action.uninstall_software) {
            (Some(change), _) => match powershell::change_registry_key(change) {
                Ok(code) => code,
                Err(message) => return Finished::failed(message),
            },
            (None, Some(uninstall)) => powershell::uninstall_software(uninstall),
            (None, None) => {
                return Finished::failed("the action has no registry or uninstall settings");
            }
        };
        match script::powershell_inline(&code, run.stem, run.job_dir, run.remaining()) {
            Ok(spec) => {
                self.run_classified(&spec, action, &run.timeout_message)
                    .await
            }
            Err(err) => Finished::failed(err.to_string()),
        }
    }

    async fn run_classified(
        &self,
        spec: &ProcessSpec,
        action: &ResolvedAction,
        timeout_message: &str,
    ) -> Finished {
        let mut spec = spec.clone();
        spec.running_file = spec.current_dir.as_deref().map(running_file);
        spec.limits = action.limits.unwrap_or_default();
        let outcome = match process::run(&spec).await {
            Err(err) => return Finished::failed(err.to_string()),
            Ok(outcome) => outcome,
        };
        let tail = outcome.output_tail;
        let mut finished = match (outcome.end, spec.limits.max_memory_bytes) {
            (ProcessEnd::TimedOut, _) => Finished::timed_out(timeout_message.to_string(), tail),
            (_, Some(bytes)) if outcome.ending.out_of_memory => Finished::failed(join(
                &format!(
                    "killed: the action used more than its maxMemory {}",
                    containment::human_bytes(bytes)
                ),
                &tail,
            )),
            (ProcessEnd::Signalled(signal), _) => {
                Finished::failed(join(&format!("killed by signal {signal}"), &tail))
            }
            (ProcessEnd::Exited(code), _) => classify_exit(action, code, tail),
        };
        let mut notes = outcome.notes;
        if outcome.ending.leftovers > 0 {
            notes.push(format!(
                "{} process(es) the action started were still running when it ended and were killed",
                outcome.ending.leftovers
            ));
        }
        if !notes.is_empty() {
            // After the headline, before the output.
            let notes = notes.join("\n");
            finished.message = match finished.message.split_once('\n') {
                Some((headline, output)) => format!("{headline}\n{notes}\n{output}"),
                None => join(&finished.message, &notes),
            };
        }
        finished
    }

    async fn step_patches(&self, record: &mut JobRecord) -> Result<(), ExecError> {
        // Journaled as running: the agent stopped while the package manager ran. It is
        // not run again over what it may have left half done.
        if let Some(cut_off) = record
            .status
            .patches
            .as_mut()
            .filter(|p| p.phase == ActionPhase::Running)
        {
            cut_off.phase = ActionPhase::Interrupted;
            cut_off.message = "interrupted: the agent stopped while the package manager ran; it was not run again (its own recovery, such as `dpkg --configure -a`, may be needed)".into();
            return self.save(record, Event::PatchesFinished);
        }
        let blocked = record
            .status
            .pre_actions
            .iter()
            .find(|a| is_failure(a.phase))
            .filter(|_| record.spec.failure_policy.pre == PreFailurePolicy::AbortPatching)
            .map(|failed| format!("not run: pre-patching task {} failed", failed.name));
        let skipped = if let Some(reason) = blocked {
            Some((ActionPhase::NotRun, reason))
        } else if record.spec.patches.skip {
            Some((
                ActionPhase::Skipped,
                "patching skipped: the plan installs no patches".to_string(),
            ))
        } else {
            None
        };
        if let Some((phase, message)) = skipped {
            record.status.patches = Some(PatchResults {
                phase,
                message,
                ..PatchResults::default()
            });
            return self.save(record, Event::PatchesFinished);
        }
        record.status.patches = Some(PatchResults {
            phase: ActionPhase::Running,
            ..PatchResults::default()
        });
        self.save(record, Event::PatchesStarted)?;
        // A classification the patcher cannot honour is refused, never widened.
        let refusal = self
            .patcher
            .and_then(|patcher| record.spec.patches.refusal_on(patcher.name()));
        let results = match (self.patcher, refusal) {
            (None, _) => PatchResults {
                phase: ActionPhase::Failed,
                message: "no supported package manager found on this host (apt, dnf, yum, zypper or Windows Update)".into(),
                ..PatchResults::default()
            },
            (Some(patcher), Some(refusal)) => {
                record.status.message = refusal.clone();
                PatchResults {
                    phase: ActionPhase::Failed,
                    patcher: Some(patcher.name().into()),
                    message: refusal,
                    ..PatchResults::default()
                }
            }
            (Some(patcher), None) => {
                // Patching has no per-task timeout; bound it generously by the job's longest action limit.
                let timeout = self.minute * crate::api::ACTION_TIMEOUT_MAX_MINUTES;
                match patcher.apply(&record.spec.patches, timeout).await {
                    Ok(results) => results,
                    Err(err) => PatchResults {
                        phase: ActionPhase::Failed,
                        patcher: Some(patcher.name().into()),
                        message: err.to_string(),
                        ..PatchResults::default()
                    },
                }
            }
        };
        record.status.patches = Some(results);
        self.save(record, Event::PatchesFinished)
    }

    /// A Reboot task: the job's one reboot, if the policy and the task allow it.
    async fn reboot_action(
        &self,
        record: &mut JobRecord,
        stage: Stage,
        index: usize,
    ) -> Result<Option<RunOutcome>, ExecError> {
        let action = Self::actions(record, stage).0[index].clone();
        let only_if_required = action.reboot.as_ref().is_some_and(|r| r.only_if_required);
        let requester = reboot_requester(&record.status);
        let needed =
            !only_if_required || requester.is_some() || record.spec.reboot == RebootPolicy::Always;
        if !needed {
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::Skipped;
            result.message = "no reboot required".into();
            record.status.reboot = Some(RebootRecord {
                state: RebootState::NotRequired,
                ..RebootRecord::default()
            });
            self.save(record, Event::ActionFinished { stage, index })?;
            return Ok(None);
        }
        if record.spec.reboot == RebootPolicy::Never {
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::Skipped;
            result.message = "reboot not performed: the job's reboot policy is Never".into();
            record.status.reboot = Some(RebootRecord {
                state: RebootState::RequiredNotPerformed,
                requested_by: Some(requester.unwrap_or_else(|| action.name.clone())),
                ..RebootRecord::default()
            });
            self.save(record, Event::ActionFinished { stage, index })?;
            return Ok(None);
        }
        {
            let result = &mut Self::actions(record, stage).1[index];
            result.phase = ActionPhase::Running;
            result.start_time = Some(Time(now()));
        }
        self.start_reboot(record, requester.unwrap_or(action.name))
            .await
    }

    /// After the post actions: reboot if something asked for it and no Reboot task did it.
    async fn final_reboot(&self, record: &mut JobRecord) -> Result<Option<RunOutcome>, ExecError> {
        // A Reboot task in the pre list was deferred until now.
        let deferred = record
            .status
            .pre_actions
            .iter()
            .zip(&record.spec.pre_actions)
            .position(|(result, action)| {
                !result.phase.is_finished() && action.action_type == TaskType::Reboot
            });
        if let Some(index) = deferred {
            return self.step_reboot_in_pre(record, index).await;
        }
        let requester = reboot_requester(&record.status)
            .or_else(|| (record.spec.reboot == RebootPolicy::Always).then(|| "policy".to_string()));
        match requester {
            None => {
                record.status.reboot = Some(RebootRecord {
                    state: RebootState::NotRequired,
                    ..RebootRecord::default()
                });
                self.save(record, Event::JobFinished)?;
                Ok(None)
            }
            Some(requester) if record.spec.reboot == RebootPolicy::Never => {
                record.status.reboot = Some(RebootRecord {
                    state: RebootState::RequiredNotPerformed,
                    requested_by: Some(requester),
                    ..RebootRecord::default()
                });
                self.save(record, Event::JobFinished)?;
                Ok(None)
            }
            Some(requester) => self.start_reboot(record, requester).await,
        }
    }

    async fn step_reboot_in_pre(
        &self,
        record: &mut JobRecord,
        index: usize,
    ) -> Result<Option<RunOutcome>, ExecError> {
        if let Some(reason) = Self::blocked(record, Stage::Pre, index) {
            let result = &mut record.status.pre_actions[index];
            result.phase = ActionPhase::NotRun;
            result.message = reason;
            self.save(
                record,
                Event::ActionFinished {
                    stage: Stage::Pre,
                    index,
                },
            )?;
            return Ok(None);
        }
        self.reboot_action(record, Stage::Pre, index).await
    }

    async fn start_reboot(
        &self,
        record: &mut JobRecord,
        requester: String,
    ) -> Result<Option<RunOutcome>, ExecError> {
        if let Some(refusal) = self.reboot_refusal {
            record.status.phase = JobPhase::Running;
            record.status.reboot = Some(RebootRecord {
                state: RebootState::RequiredNotPerformed,
                requested_by: Some(requester),
                ..RebootRecord::default()
            });
            let message = format!("reboot not performed: {refusal}");
            end_running_actions(&mut record.status, ActionPhase::Skipped, &message);
            record.status.message = message;
            self.save(record, Event::RebootRefused)?;
            return Ok(None);
        }
        if let Some(gate) = self.reboot_gate {
            if record.status.reboot.as_ref().map(|r| r.state) != Some(RebootState::Pending) {
                record.status.reboot = Some(RebootRecord {
                    state: RebootState::Pending,
                    requested_by: Some(requester.clone()),
                    ..RebootRecord::default()
                });
                record.status.message = "waiting for the controller's permission to reboot".into();
                self.save(record, Event::RebootRequested)?;
            }
            let permitted = match self.cancel {
                None => gate.permit(record).await,
                Some(cancel) => tokio::select! {
                    permitted = gate.permit(record) => permitted,
                    () = cancel.cancelled() => Err(format!("cancelled: {}", cancel.reason().unwrap_or_default())),
                },
            };
            if let Err(reason) = permitted {
                return self.reboot_not_performed(record, reason);
            }
            record.status.message.clear();
        }
        record.boot_id_at_reboot = self.rebooter.boot_id();
        record.status.phase = JobPhase::Rebooting;
        record.status.reboot = Some(RebootRecord {
            state: RebootState::InProgress,
            requested_by: Some(requester),
            started_at: Some(Time(now())),
            ..RebootRecord::default()
        });
        self.save(record, Event::RebootStarted)?;
        if let Err(err) = self.rebooter.reboot() {
            return self.reboot_not_performed(record, err.to_string());
        }
        Ok(Some(RunOutcome::Rebooting))
    }

    /// A reboot that was due did not happen: the Reboot action (if any) fails with the
    /// reason, and so does the job.
    fn reboot_not_performed(
        &self,
        record: &mut JobRecord,
        reason: String,
    ) -> Result<Option<RunOutcome>, ExecError> {
        record.status.phase = JobPhase::Running;
        if let Some(reboot) = record.status.reboot.as_mut() {
            reboot.state = RebootState::RequiredNotPerformed;
            reboot.message = Some(reason.clone());
        }
        end_running_actions(&mut record.status, ActionPhase::Failed, &reason);
        record.status.message = reason;
        self.save(record, Event::JobFinished)?;
        Ok(None)
    }

    fn resume_reboot(&self, record: &mut JobRecord) -> Result<(), ExecError> {
        let came_back = match (&record.boot_id_at_reboot, self.rebooter.boot_id()) {
            (Some(before), Some(now)) => *before != now,
            _ => true,
        };
        record.status.phase = JobPhase::Running;
        if came_back {
            end_running_actions(&mut record.status, ActionPhase::Succeeded, "host rebooted");
        } else {
            end_running_actions(
                &mut record.status,
                ActionPhase::Failed,
                "the agent restarted but the host did not reboot",
            );
        }
        if let Some(reboot) = record.status.reboot.as_mut() {
            if came_back {
                reboot.state = RebootState::Completed;
                reboot.completed_at = Some(Time(now()));
            } else {
                reboot.state = RebootState::RequiredNotPerformed;
            }
        }
        self.save(record, Event::RebootCompleted)
    }

    /// Ends a cancelled job: what did not run never will, no reboot follows, and the job
    /// fails saying why.
    fn stop(&self, record: &mut JobRecord, reason: &str) -> Result<(), ExecError> {
        let message = format!("cancelled: {reason}");
        let status = &mut record.status;
        for action in status
            .pre_actions
            .iter_mut()
            .chain(status.post_actions.iter_mut())
        {
            if !action.phase.is_finished() {
                action.phase = if action.phase == ActionPhase::Running {
                    ActionPhase::Interrupted
                } else {
                    ActionPhase::NotRun
                };
                action.message = message.clone();
            }
        }
        if status
            .patches
            .as_ref()
            .is_none_or(|p| !p.phase.is_finished())
        {
            status.patches = Some(PatchResults {
                phase: ActionPhase::NotRun,
                message: message.clone(),
                ..Default::default()
            });
        }
        if let Some(reboot) = &mut status.reboot
            && matches!(reboot.state, RebootState::Pending)
        {
            reboot.state = RebootState::RequiredNotPerformed;
            reboot.message = Some(message.clone());
        }
        status.phase = JobPhase::Failed;
        status.message = message.clone();
        status.completion_time = Some(Time(now()));
        conditions::set_outcome(
            &mut status.conditions,
            false,
            "Cancelled",
            &message,
            status.observed_generation,
            now(),
        );
        let _ = std::fs::remove_dir_all(self.job_dir(record));
        self.save(record, Event::JobFinished)
    }

    fn finish(&self, record: &mut JobRecord) -> Result<(), ExecError> {
        let status = &mut record.status;
        let failed_action = status
            .pre_actions
            .iter()
            .chain(&status.post_actions)
            .find(|a| is_failure(a.phase))
            .map(|a| a.name.clone());
        let patches_failed = status
            .patches
            .as_ref()
            .is_some_and(|p| matches!(p.phase, ActionPhase::Failed | ActionPhase::TimedOut));
        let reboot_failed = status
            .reboot
            .as_ref()
            .and_then(|r| r.message.clone())
            .filter(|_| failed_action.is_none() && !patches_failed);
        let message = match (&failed_action, patches_failed) {
            (Some(name), _) => format!("action {name} failed"),
            (None, true) => "patching failed".to_string(),
            (None, false) if reboot_failed.is_some() => format!(
                "the reboot did not happen: {}",
                reboot_failed.as_deref().unwrap_or_default()
            ),
            (None, false) => match status.reboot.as_ref().map(|r| r.state) {
                Some(RebootState::RequiredNotPerformed) => match self.reboot_refusal {
                    Some(refusal) => {
                        format!("succeeded; a reboot is required but was not performed: {refusal}")
                    }
                    None => "succeeded; a reboot is required but was not performed".into(),
                },
                Some(RebootState::Completed) => "succeeded after a reboot".into(),
                _ => "succeeded".into(),
            },
        };
        let succeeded = failed_action.is_none() && !patches_failed && reboot_failed.is_none();
        status.phase = if succeeded {
            JobPhase::Succeeded
        } else {
            JobPhase::Failed
        };
        status.completion_time = Some(Time(now()));
        if status.message.is_empty() || succeeded || reboot_failed.is_some() {
            status.message = message.clone();
        }
        conditions::set_job_finished(
            &mut status.conditions,
            succeeded,
            &message,
            status.observed_generation,
            now(),
        );
        conditions::set_patches_partially_failed(
            &mut status.conditions,
            status.patches.as_ref(),
            status.observed_generation,
            now(),
        );
        let _ = std::fs::remove_dir_all(self.job_dir(record));
        self.save(record, Event::JobFinished)
    }
}

/// What an action's exit code means: the seeds' codes (0, 10, 11, `successExitCodes`),
/// and for generated uninstall code its "nothing to remove" code, which is Skipped.
fn classify_exit(action: &ResolvedAction, code: i32, output: String) -> Finished {
    if action.action_type == TaskType::UninstallSoftware && code == powershell::NOT_APPLICABLE_EXIT
    {
        return Finished {
            phase: ActionPhase::Skipped,
            exit_code: Some(code),
            reboot_requested: false,
            message: output,
        };
    }
    let meaning = ExitOutcome::classify(code, &action.success_exit_codes);
    Finished {
        phase: if meaning.succeeded {
            ActionPhase::Succeeded
        } else {
            ActionPhase::Failed
        },
        exit_code: Some(code),
        reboot_requested: meaning.reboot_requested,
        message: output,
    }
}

/// Result of one action before it is written into the status.
struct Finished {
    phase: ActionPhase,
    exit_code: Option<i32>,
    reboot_requested: bool,
    message: String,
}

impl Finished {
    fn failed(message: impl Into<String>) -> Self {
        Self {
            phase: ActionPhase::Failed,
            exit_code: None,
            reboot_requested: false,
            message: message.into(),
        }
    }

    fn timed_out(reason: String, output: String) -> Self {
        Self {
            phase: ActionPhase::TimedOut,
            exit_code: None,
            reboot_requested: false,
            message: join(&reason, &output),
        }
    }
}

/// One action on its way to a result: where it runs and by when.
struct ActionRun<'a> {
    action: &'a ResolvedAction,
    job_dir: &'a std::path::Path,
    stem: &'a str,
    deadline: Instant,
    timeout_message: String,
}

impl ActionRun<'_> {
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// What a detection script's end means: `None` to go on and install, else the
/// action's result.
fn detection_verdict(end: ProcessEnd, output: String, timeout_message: &str) -> Option<Finished> {
    match end {
        ProcessEnd::TimedOut => Some(Finished::timed_out(
            format!("detection script {timeout_message}"),
            output,
        )),
        ProcessEnd::Exited(code) if detection_says_install(code) => None,
        ProcessEnd::Exited(code) => Some(Finished {
            phase: ActionPhase::Skipped,
            exit_code: Some(code),
            reboot_requested: false,
            message: join(
                &format!("not needed: the detection script exited {code}"),
                &output,
            ),
        }),
        ProcessEnd::Signalled(signal) => Some(Finished::failed(join(
            &format!("detection script killed by signal {signal}"),
            &output,
        ))),
    }
}

fn join(headline: &str, output: &str) -> String {
    if output.is_empty() {
        headline.to_string()
    } else {
        format!("{headline}\n{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::ObjectRef;

    fn action(action_type: TaskType, success: &[i32]) -> ResolvedAction {
        ResolvedAction {
            name: "a".into(),
            task: ObjectRef::default(),
            action_type,
            timeout_minutes: 1,
            success_exit_codes: success.to_vec(),
            parameters: Default::default(),
            bypass_execution_policy: false,
            script: None,
            detection_script: None,
            download: None,
            change_registry_key: None,
            uninstall_software: None,
            reboot: None,
            limits: None,
        }
    }

    #[test]
    fn exit_codes_follow_the_seeds_and_nothing_to_uninstall_is_skipped() {
        let phase = |t, code| classify_exit(&action(t, &[0]), code, String::new()).phase;
        assert_eq!(phase(TaskType::RunScript, 0), ActionPhase::Succeeded);
        assert_eq!(phase(TaskType::RunScript, 11), ActionPhase::Failed);
        let rebooting = classify_exit(&action(TaskType::RunScript, &[0]), 10, String::new());
        assert_eq!(
            (rebooting.phase, rebooting.reboot_requested),
            (ActionPhase::Succeeded, true)
        );
        assert_eq!(
            phase(TaskType::UninstallSoftware, powershell::NOT_APPLICABLE_EXIT),
            ActionPhase::Skipped
        );
        // The code means nothing special to anyone else's scripts.
        assert_eq!(
            phase(TaskType::RunScript, powershell::NOT_APPLICABLE_EXIT),
            ActionPhase::Failed
        );
    }

    #[test]
    fn a_record_with_more_results_than_actions_never_points_past_its_spec() {
        let spec = PatchJobSpec::bare("a", "", "");
        let mut record = new_record("j", "n", spec);
        record.status.patches = Some(PatchResults {
            phase: ActionPhase::Succeeded,
            ..Default::default()
        });
        record.status.post_actions.push(ActionResult::default());
        assert_ne!(next_step(&record), Step::Action(Stage::Post, 0));
    }

    /// Attack (a crash mid-patch): the agent is SIGKILLed — by a package's scriptlet, the
    /// OOM killer or an operator — while the patcher runs. The journal says the patch
    /// step is Running. An action cut off like that is reported Interrupted and never
    /// run again; the patch step is not: the restarted agent runs the package manager a
    /// second time (against a dpkg/rpm database the first run left half-done), and the
    /// job never says it was interrupted.
    #[tokio::test]
    async fn patches_cut_off_by_a_crash_are_interrupted_not_run_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Counting(AtomicUsize);
        impl Patcher for Counting {
            fn name(&self) -> &'static str {
                "apt"
            }
            fn apply<'a>(
                &'a self,
                _selection: &'a crate::api::plan::PatchSelection,
                _timeout: Duration,
            ) -> futures::future::BoxFuture<
                'a,
                Result<PatchResults, super::super::patcher::PatchError>,
            > {
                self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Ok(PatchResults {
                        phase: ActionPhase::Succeeded,
                        patcher: Some("apt".into()),
                        ..Default::default()
                    })
                })
            }
        }
        struct NoReboot;
        impl Rebooter for NoReboot {
            fn boot_id(&self) -> Option<String> {
                Some("boot-1".into())
            }
            fn reboot(&self) -> Result<(), super::super::reboot::RebootError> {
                panic!("no reboot in this test")
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let spec = PatchJobSpec {
            reboot: RebootPolicy::Never,
            ..PatchJobSpec::bare("a", "", "")
        };
        assert!(!spec.patches.skip);
        // What the journal holds after `PatchesStarted`, when the agent was killed.
        let mut record = new_record("j", "team/j", spec);
        record.status.phase = JobPhase::Running;
        record.status.start_time = Some(Time(now()));
        record.status.patches = Some(PatchResults {
            phase: ActionPhase::Running,
            ..PatchResults::default()
        });
        journal.save(&record).unwrap();
        let mut record = journal.load("j").unwrap().unwrap();
        let patcher = Counting(AtomicUsize::new(0));
        let on_event = |_: &JobRecord, _: &Event| {};
        let executor = Executor {
            journal: &journal,
            work_dir: dir.path().join("work"),
            patcher: Some(&patcher),
            rebooter: &NoReboot,
            minute: Duration::from_millis(100),
            max_download_bytes: 1 << 20,
            on_event: &on_event,
            reboot_gate: None,
            cancel: None,
            reboot_refusal: None,
        };
        executor.run(&mut record).await.unwrap();
        let patches = record.status.patches.clone().unwrap();
        assert_eq!(
            patcher.0.load(Ordering::SeqCst),
            0,
            "the package manager ran a second time after the crash; the job ends {:?} with patches {:?}",
            record.status.phase,
            patches.phase
        );
        assert_eq!(patches.phase, ActionPhase::Interrupted);
    }
}
