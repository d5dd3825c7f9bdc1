//! The agent protocol, versioned under `/agent/v1`: what agents send and receive.
//! Scripts travel base64-encoded next to their SHA-256; the agent decodes them and
//! checks the hash before anything runs.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::OperatingSystem;
use crate::api::agent::{Platform, UpdateInventory};
use crate::api::conditions;
use crate::api::patchjob::{
    ActionResult, JobPhase, PatchJobSpec, PatchJobStatus, PatchOutcome, PatchResults, RebootRecord,
    ResolvedScript,
};
use crate::api::resolve::content_sha256;

/// Path prefix of every agent endpoint.
pub const PREFIX: &str = "/agent/v1";

/// Header by which a node agent names its node.
pub const NODE_HEADER: &str = "x-fleetpatch-node";

/// `POST /agent/v1/register`: an external host exchanges a bootstrap token for its own
/// credential; a node agent (authenticated by its ServiceAccount token) just announces itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Agent name wanted; becomes the Agent resource's name.
    pub name: String,
    pub os: OperatingSystem,
    /// Bootstrap token (external hosts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    /// Labels for the Agent resource, used by plan selectors.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub agent: String,
    /// Per-agent credential for external hosts, shown once; the gateway keeps only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// `POST /agent/v1/heartbeat`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub version: String,
    /// uid of the job the agent is running, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    /// What the host says of itself; the gateway copies it into the Agent's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdateInventory>,
}

/// One job handed to an agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The frozen spec with every script body base64-encoded.
    pub spec: PatchJobSpec,
    /// Highest progress sequence the gateway has applied (0 for a new job).
    pub acknowledged_sequence: i64,
}

/// `GET /agent/v1/assignments?waitSeconds=N`: the agent's unfinished jobs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignments {
    pub jobs: Vec<Assignment>,
}

/// What a heartbeat is answered with: the jobs the agent must stop (deleted, or the
/// agent was paused), by uid.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatAnswer {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel: Vec<String>,
}

/// `POST /agent/v1/jobs/{uid}/progress`: the job's whole status at one sequence number.
/// Reports are idempotent: one at or below the acknowledged sequence changes nothing.
/// A report on a finished job is refused (409) and changes nothing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    pub sequence: i64,
    pub status: PatchJobStatus,
    /// The job's namespace and name, so a gateway that has not seen the job yet (another
    /// replica handed it out) can look it up, and one that knows it is gone can say so (410).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobName>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobName {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressAck {
    pub acknowledged_sequence: i64,
}

/// `GET /agent/v1/jobs/{uid}/reboot`: may a node agent reboot its node now?
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RebootVerdict {
    /// Not yet: the node is being cordoned and drained, or other nodes of the plan reboot.
    Waiting,
    /// The node is drained; reboot.
    Approved,
    /// Do not reboot (the drain timed out, the job ended); the message says why.
    Denied,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RebootDecision {
    pub verdict: RebootVerdict,
    #[serde(default)]
    pub message: String,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// Highest progress sequence number accepted (far beyond any job's steps, far below
/// where arithmetic on it could overflow).
pub const MAX_SEQUENCE: i64 = 1 << 40;
/// Longest text kept from an agent: an action's or the job's message.
pub const MAX_MESSAGE: usize = 4096;
/// Longest short text kept from an agent: names, versions, host names.
pub const MAX_SHORT: usize = 253;
/// Most patches listed as installed or as failed.
pub const MAX_PATCHES: usize = 2000;
/// How far an agent's clock may be ahead before its times are replaced by ours.
const CLOCK_SKEW: SignedDuration = SignedDuration::from_mins(5);

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What is wrong with the platform an agent reports, if anything.
pub fn platform_problem(platform: &Platform) -> Option<String> {
    let fields = [
        ("name", platform.name.as_str()),
        ("version", platform.version.as_str()),
        ("arch", platform.arch.as_str()),
        ("patcher", platform.patcher.as_deref().unwrap_or_default()),
    ];
    fields
        .iter()
        .find(|(_, value)| value.len() > 64 || value.chars().any(char::is_control))
        .map(|(field, _)| format!("platform.{field} must be at most 64 printable characters"))
}

/// A heartbeat made safe to keep and show: texts bounded, counts not negative, and
/// `current_job` only when it is one of `own_jobs` (namespace/name).
pub fn accept_heartbeat(mut beat: Heartbeat, own_jobs: &[String]) -> Heartbeat {
    beat.version = bounded(&beat.version, 64);
    beat.hostname = beat.hostname.map(|h| bounded(&h, MAX_SHORT));
    if beat
        .platform
        .as_ref()
        .is_some_and(|p| platform_problem(p).is_some())
    {
        beat.platform = None;
    }
    if let Some(updates) = &mut beat.updates {
        updates.available = updates.available.max(0);
        updates.security = updates.security.max(0);
        updates.checked_at = None;
    }
    beat.current_job = beat.current_job.filter(|job| own_jobs.contains(job));
    beat
}

/// Why a progress report is refused (422).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportProblem {
    #[error("sequence must be between 1 and {MAX_SEQUENCE}")]
    Sequence,
    #[error("phase {0:?} is not one an agent reports")]
    Phase(JobPhase),
    #[error(
        "{stage} actions do not match the job: expected at most {expected} named as in the spec"
    )]
    Actions {
        stage: &'static str,
        expected: usize,
    },
}

/// The status an agent reported, made safe to store. It must fit the job (no phase
/// only the controller sets, no action the spec lacks); every time it carries must be
/// plausible (not before the job was created, not ahead of our clock) or is replaced by
/// `now`; texts and lists are bounded; and what the gateway owns — conditions,
/// `completionTime`, `progress`, `lastSequence`, `observedGeneration` — comes from the
/// gateway, not the agent. Nothing here can overflow or panic on any input.
pub fn accept_report(
    spec: &PatchJobSpec,
    stored: Option<&PatchJobStatus>,
    created: Option<Timestamp>,
    report: ProgressReport,
    now: Timestamp,
) -> Result<PatchJobStatus, ReportProblem> {
    check_fits(spec, &report)?;
    let mut status = report.status;
    let plausible = plausible_times(created, now);
    for action in status
        .pre_actions
        .iter_mut()
        .chain(status.post_actions.iter_mut())
    {
        accept_action(action, &plausible);
    }
    if let Some(patches) = &mut status.patches {
        accept_patches(patches);
    }
    if let Some(reboot) = &mut status.reboot {
        accept_reboot(reboot, &plausible);
    }
    status.message = bounded(&status.message, MAX_MESSAGE);
    status.start_time = stored
        .and_then(|s| s.start_time.clone())
        .or_else(|| plausible(status.start_time.take()))
        .or(Some(Time(now)));
    status.progress = Some(progress(spec, &status));
    set_gateway_outcome(&mut status, stored, now);
    status.last_sequence = Some(report.sequence);
    status.observed_generation = None;
    Ok(status)
}

/// A report fits its job: a sequence in range, a phase an agent may report, and
/// results for no action the spec lacks, in the spec's order.
fn check_fits(spec: &PatchJobSpec, report: &ProgressReport) -> Result<(), ReportProblem> {
    if !(1..=MAX_SEQUENCE).contains(&report.sequence) {
        return Err(ReportProblem::Sequence);
    }
    let status = &report.status;
    if status.phase == JobPhase::Unknown {
        return Err(ReportProblem::Phase(status.phase));
    }
    for (stage, results, actions) in [
        ("pre", &status.pre_actions, &spec.pre_actions),
        ("post", &status.post_actions, &spec.post_actions),
    ] {
        let fits = results.len() <= actions.len()
            && results.iter().zip(actions).all(|(r, a)| r.name == a.name);
        if !fits {
            return Err(ReportProblem::Actions {
                stage,
                expected: actions.len(),
            });
        }
    }
    Ok(())
}

/// A reported time kept when plausible (not more than an hour before the job was
/// created, not ahead of our clock beyond the skew), else `now`.
fn plausible_times(
    created: Option<Timestamp>,
    now: Timestamp,
) -> impl Fn(Option<Time>) -> Option<Time> {
    let earliest = created.map_or(Timestamp::MIN, |c| {
        c.saturating_sub(SignedDuration::from_hours(1))
            .unwrap_or(Timestamp::MIN)
    });
    let latest = now.saturating_add(CLOCK_SKEW).unwrap_or(Timestamp::MAX);
    move |time: Option<Time>| -> Option<Time> {
        time.map(|t| {
            if t.0 >= earliest && t.0 <= latest {
                t
            } else {
                Time(now)
            }
        })
    }
}

fn accept_patches(patches: &mut PatchResults) {
    patches.patcher = patches.patcher.as_deref().map(|p| bounded(p, 64));
    patches.message = bounded(&patches.message, MAX_MESSAGE);
    for list in [&mut patches.installed, &mut patches.failed] {
        list.truncate(MAX_PATCHES);
        list.iter_mut().for_each(accept_patch);
    }
}

fn accept_reboot(reboot: &mut RebootRecord, plausible: &impl Fn(Option<Time>) -> Option<Time>) {
    reboot.requested_by = reboot
        .requested_by
        .as_deref()
        .map(|r| bounded(r, MAX_SHORT));
    reboot.message = reboot.message.as_deref().map(|m| bounded(m, MAX_MESSAGE));
    reboot.started_at = plausible(reboot.started_at.take());
    reboot.completed_at = plausible(reboot.completed_at.take());
}

/// `done/total` over the spec's actions.
fn progress(spec: &PatchJobSpec, status: &PatchJobStatus) -> String {
    let done = status
        .pre_actions
        .iter()
        .chain(&status.post_actions)
        .filter(|a| a.phase.is_finished())
        .count();
    format!(
        "{done}/{}",
        spec.pre_actions.len() + spec.post_actions.len()
    )
}

/// Conditions and the completion time are the gateway's, from the phase.
fn set_gateway_outcome(
    status: &mut PatchJobStatus,
    stored: Option<&PatchJobStatus>,
    now: Timestamp,
) {
    status.conditions = stored.map(|s| s.conditions.clone()).unwrap_or_default();
    status.completion_time = None;
    if !status.phase.is_finished() {
        return;
    }
    conditions::set_job_finished(
        &mut status.conditions,
        status.phase == JobPhase::Succeeded,
        &status.message,
        None,
        now,
    );
    // Its Event is told when the status is written (`story::told_by`).
    conditions::set_patches_partially_failed(
        &mut status.conditions,
        status.patches.as_ref(),
        None,
        now,
    );
    status.completion_time = Some(Time(now));
}

fn accept_action(action: &mut ActionResult, plausible: &impl Fn(Option<Time>) -> Option<Time>) {
    action.message = bounded(&action.message, MAX_MESSAGE);
    action.start_time = plausible(action.start_time.take());
    action.finish_time = plausible(action.finish_time.take());
}

fn accept_patch(patch: &mut PatchOutcome) {
    patch.name = bounded(&patch.name, MAX_SHORT);
    patch.version = patch.version.as_deref().map(|v| bounded(v, MAX_SHORT));
    patch.message = patch.message.as_deref().map(|m| bounded(m, 1024));
}

fn scripts_mut(spec: &mut PatchJobSpec) -> impl Iterator<Item = &mut ResolvedScript> {
    spec.pre_actions
        .iter_mut()
        .chain(spec.post_actions.iter_mut())
        .flat_map(|action| {
            action
                .script
                .iter_mut()
                .chain(action.detection_script.iter_mut())
        })
}

/// The spec as it travels: script bodies base64-encoded.
pub fn encode_spec(spec: &PatchJobSpec) -> PatchJobSpec {
    let mut wire = spec.clone();
    for script in scripts_mut(&mut wire) {
        script.content = STANDARD.encode(script.content.as_bytes());
    }
    wire
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("script {0} is not valid base64")]
    Base64(String),
    #[error("script {0} is not UTF-8")]
    Utf8(String),
    #[error("script {source_name} does not match its SHA-256 (expected {expected}, got {actual})")]
    Hash {
        source_name: String,
        expected: String,
        actual: String,
    },
}

/// The spec as received: script bodies decoded and checked against their SHA-256.
pub fn decode_spec(wire: &PatchJobSpec) -> Result<PatchJobSpec, DecodeError> {
    let mut spec = wire.clone();
    for script in scripts_mut(&mut spec) {
        let name = script.source.to_string();
        let bytes = STANDARD
            .decode(script.content.as_bytes())
            .map_err(|_| DecodeError::Base64(name.clone()))?;
        let content = String::from_utf8(bytes).map_err(|_| DecodeError::Utf8(name.clone()))?;
        let actual = content_sha256(&content);
        if !actual.eq_ignore_ascii_case(&script.sha256) {
            return Err(DecodeError::Hash {
                source_name: name,
                expected: script.sha256.clone(),
                actual,
            });
        }
        script.content = content;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resolve::linux_default_spec as spec;

    #[test]
    fn a_finished_job_whose_patches_partly_failed_gets_the_condition() {
        use crate::api::patchjob::{ActionPhase, PatchOutcome, PatchResults};
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let outcome = |name: &str| PatchOutcome {
            name: name.into(),
            ..PatchOutcome::default()
        };
        let report = |phase: JobPhase, patches: ActionPhase| ProgressReport {
            sequence: 1,
            status: PatchJobStatus {
                phase,
                patches: Some(PatchResults {
                    phase: patches,
                    installed: vec![outcome("curl")],
                    failed: vec![outcome("openssl")],
                    ..PatchResults::default()
                }),
                ..PatchJobStatus::default()
            },
            job: None,
        };
        fn partial(status: &PatchJobStatus) -> Option<&str> {
            conditions::status(&status.conditions, conditions::PATCHES_PARTIALLY_FAILED)
        }
        let spec = spec();
        let running = accept_report(
            &spec,
            None,
            None,
            report(JobPhase::Running, ActionPhase::Succeeded),
            now,
        )
        .unwrap();
        assert_eq!(partial(&running), None, "only once the job has finished");
        let done = accept_report(
            &spec,
            None,
            None,
            report(JobPhase::Succeeded, ActionPhase::Succeeded),
            now,
        )
        .unwrap();
        assert_eq!(partial(&done), Some(conditions::TRUE));
        let failed = accept_report(
            &spec,
            None,
            None,
            report(JobPhase::Failed, ActionPhase::Failed),
            now,
        )
        .unwrap();
        assert_eq!(
            partial(&failed),
            None,
            "a failed patch step is no partial success"
        );
    }

    #[test]
    fn scripts_round_trip_base64_and_are_hash_checked() {
        let original = spec();
        let wire = encode_spec(&original);
        let script = wire.post_actions[0].script.as_ref().unwrap();
        assert!(!script.content.contains('\n'), "travels as base64");
        assert_eq!(decode_spec(&wire).unwrap(), original);

        let mut tampered = wire.clone();
        let evil = STANDARD.encode("reboot -f");
        tampered.post_actions[0].script.as_mut().unwrap().content = evil;
        assert!(matches!(
            decode_spec(&tampered),
            Err(DecodeError::Hash { .. })
        ));
    }
}
