//! A job's story for `kubectl describe patchjob`: which Events a change of its status
//! tells (started, an action failed with its exit code, rebooting, back from the
//! reboot, a reboot left out, succeeded or failed). Pure: the gateway keeps a small
//! [`Told`] per job, compares each status it writes with it, and queues what is new.
//! Written statuses are coalesced, so the story is told from what changed, not from
//! which reports arrived: a job seen Pending and then Succeeded still "started".

use kube::runtime::events::EventType;

use crate::api::patchjob::{ActionPhase, JobPhase, PatchJobStatus, RebootState};

/// One Event of the story.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoryEvent {
    pub type_: EventType,
    pub reason: &'static str,
    /// Distinct per action for action failures, so the recorder does not fold two
    /// failed actions into one series.
    pub action: String,
    pub note: String,
}

/// What the Events of one job have told so far: small, kept per job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Told {
    phase: JobPhase,
    /// Failed pre and post actions, as (stage, index).
    failed: Vec<(&'static str, usize)>,
    patches_failed: bool,
    /// The patch step succeeded although some of its patches failed.
    patches_partly_failed: bool,
    reboot: Option<RebootState>,
}

/// Whether the status says the patch step succeeded with some patches failed.
fn partly_failed(status: &PatchJobStatus) -> bool {
    crate::api::conditions::status(
        &status.conditions,
        crate::api::conditions::PATCHES_PARTIALLY_FAILED,
    ) == Some(crate::api::conditions::TRUE)
}

fn failed(phase: ActionPhase) -> bool {
    matches!(
        phase,
        ActionPhase::Failed | ActionPhase::TimedOut | ActionPhase::Interrupted
    )
}

impl Told {
    /// What a status already shows (the job as the gateway found it).
    pub fn of(status: &PatchJobStatus) -> Self {
        let stages = [("pre", &status.pre_actions), ("post", &status.post_actions)];
        Self {
            phase: status.phase,
            failed: stages
                .iter()
                .flat_map(|(stage, results)| {
                    results
                        .iter()
                        .enumerate()
                        .filter(|(_, result)| failed(result.phase))
                        .map(|(index, _)| (*stage, index))
                })
                .collect(),
            patches_failed: status
                .patches
                .as_ref()
                .is_some_and(|p| matches!(p.phase, ActionPhase::Failed | ActionPhase::TimedOut)),
            patches_partly_failed: partly_failed(status),
            reboot: status.reboot.as_ref().map(|r| r.state),
        }
    }
}

/// The first line of an action's output, bounded, for a note.
fn first_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.chars().take(200).collect()
}

fn normal(reason: &'static str, action: &str, note: String) -> StoryEvent {
    StoryEvent {
        type_: EventType::Normal,
        reason,
        action: action.into(),
        note,
    }
}

fn warning(reason: &'static str, action: &str, note: String) -> StoryEvent {
    StoryEvent {
        type_: EventType::Warning,
        reason,
        action: action.into(),
        note,
    }
}

/// Most bytes of an Event's note (the API server refuses more than 1 kB).
pub const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to [`MAX_NOTE_BYTES`] at a character boundary.
pub fn bounded_note(mut note: String) -> String {
    if note.len() > MAX_NOTE_BYTES {
        let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// Why a required reboot did not happen: the reboot record's reason, else the reason
/// the agent gave in the job's or the Reboot action's message ("... not performed: WHY").
fn why_not_rebooted(status: &PatchJobStatus) -> Option<String> {
    let reason = status.reboot.as_ref().and_then(|r| r.message.clone());
    let given = || {
        std::iter::once(&status.message)
            .chain(status.post_actions.iter().map(|a| &a.message))
            .chain(status.pre_actions.iter().map(|a| &a.message))
            .find_map(|message| message.split_once("not performed: ").map(|(_, why)| why))
            .map(first_line)
    };
    reason.filter(|r| !r.is_empty()).or_else(given)
}

/// The Event of a job handed to its agent.
pub fn assigned(agent: &str) -> StoryEvent {
    normal("Assigned", "Assign", format!("assigned to agent {agent}"))
}

/// The Events `after` tells that `before` had not, in the order they happened.
pub fn told_by(before: &Told, after: &PatchJobStatus, agent: &str) -> Vec<StoryEvent> {
    let mut events = Vec::new();
    if before.phase == JobPhase::Pending && after.phase != JobPhase::Pending {
        events.push(normal(
            "Started",
            "Run",
            format!("agent {agent} started the job"),
        ));
    }
    events.extend(action_failures(before, after));
    events.extend(patching_told_by(before, after));
    events.extend(reboot_told_by(before.reboot, after));
    if !before.phase.is_finished() {
        match after.phase {
            JobPhase::Succeeded => {
                events.push(normal("Succeeded", "Finish", after.message.clone()));
            }
            JobPhase::Failed => events.push(warning("Failed", "Finish", after.message.clone())),
            _ => {}
        }
    }
    events
}

/// An `ActionFailed` Event for each pre and post action that failed since `before`.
fn action_failures(before: &Told, after: &PatchJobStatus) -> Vec<StoryEvent> {
    let mut events = Vec::new();
    for (stage, results) in [("pre", &after.pre_actions), ("post", &after.post_actions)] {
        for (index, result) in results.iter().enumerate() {
            if !failed(result.phase) || before.failed.contains(&(stage, index)) {
                continue;
            }
            let how = match (result.phase, result.exit_code) {
                (ActionPhase::TimedOut, _) => "timed out".to_string(),
                (ActionPhase::Interrupted, _) => "was interrupted".to_string(),
                (_, Some(code)) => format!("failed with exit code {code}"),
                (_, None) => "failed".to_string(),
            };
            let output = first_line(&result.message);
            let note = if output.is_empty() {
                format!("{stage} action {} {how}", result.name)
            } else {
                format!("{stage} action {} {how}: {output}", result.name)
            };
            let action = format!(
                "Run{}Action{}",
                if stage == "pre" { "Pre" } else { "Post" },
                index + 1
            );
            events.push(warning("ActionFailed", &action, note));
        }
    }
    events
}

/// The patch step failing, or succeeding with some patches failed, since `before`.
fn patching_told_by(before: &Told, after: &PatchJobStatus) -> Vec<StoryEvent> {
    let mut events = Vec::new();
    if let Some(patches) = &after.patches
        && matches!(patches.phase, ActionPhase::Failed | ActionPhase::TimedOut)
        && !before.patches_failed
    {
        events.push(warning(
            "PatchingFailed",
            "Patch",
            format!("patching failed: {}", first_line(&patches.message)),
        ));
    }
    if partly_failed(after) && !before.patches_partly_failed {
        let message = after
            .conditions
            .iter()
            .find(|c| c.type_ == crate::api::conditions::PATCHES_PARTIALLY_FAILED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        events.push(warning(
            "PatchesPartiallyFailed",
            "Patch",
            format!("patching succeeded, but {message}"),
        ));
    }
    events
}

/// The reboot's steps since it was `was`: going down, back up (with the going down
/// when that was never seen), or required but not performed.
fn reboot_told_by(was: Option<RebootState>, after: &PatchJobStatus) -> Vec<StoryEvent> {
    let reboot = after.reboot.as_ref();
    let requested_by = reboot
        .and_then(|r| r.requested_by.clone())
        .unwrap_or_else(|| "the job".into());
    let rebooting = || {
        normal(
            "Rebooting",
            "Reboot",
            format!("rebooting the host (requested by {requested_by})"),
        )
    };
    match reboot.map(|r| r.state) {
        Some(RebootState::InProgress) if was != Some(RebootState::InProgress) => {
            vec![rebooting()]
        }
        Some(RebootState::Completed) if was != Some(RebootState::Completed) => {
            let back = normal(
                "RebootCompleted",
                "Reboot",
                "the host is back from its reboot".into(),
            );
            if was != Some(RebootState::InProgress) {
                vec![rebooting(), back]
            } else {
                vec![back]
            }
        }
        Some(RebootState::RequiredNotPerformed)
            if was != Some(RebootState::RequiredNotPerformed) =>
        {
            let mut note =
                format!("a reboot is required (requested by {requested_by}) but was not performed");
            if let Some(why) = why_not_rebooted(after) {
                note = format!("{note}: {why}");
            }
            vec![warning("RebootNotPerformed", "Reboot", note)]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::patchjob::{ActionResult, RebootRecord};

    fn action(name: &str, phase: ActionPhase, exit_code: Option<i32>) -> ActionResult {
        ActionResult {
            name: name.into(),
            phase,
            exit_code,
            message: "disk on fire\nmore".into(),
            ..Default::default()
        }
    }

    fn reasons(events: &[StoryEvent]) -> Vec<&'static str> {
        events.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn patches_that_partly_failed_are_told_once() {
        let mut status = PatchJobStatus {
            phase: JobPhase::Running,
            patches: Some(crate::api::patchjob::PatchResults {
                phase: ActionPhase::Succeeded,
                installed: vec![crate::api::patchjob::PatchOutcome {
                    name: "curl".into(),
                    ..Default::default()
                }],
                failed: vec![crate::api::patchjob::PatchOutcome {
                    name: "app".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        crate::api::conditions::set_patches_partially_failed(
            &mut status.conditions,
            status.patches.as_ref(),
            None,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let told = Told {
            phase: JobPhase::Running,
            ..Told::default()
        };
        let events = told_by(&told, &status, "web-1");
        assert_eq!(reasons(&events), ["PatchesPartiallyFailed"]);
        assert!(
            events[0].note.contains("1 of 2 patch(es) failed: app"),
            "{}",
            events[0].note
        );
        assert!(told_by(&Told::of(&status), &status, "web-1").is_empty());
    }

    #[test]
    fn each_transition_is_told_once() {
        let mut status = PatchJobStatus {
            phase: JobPhase::Running,
            pre_actions: vec![action("check", ActionPhase::Running, None)],
            ..Default::default()
        };
        let told = Told::default();
        assert_eq!(reasons(&told_by(&told, &status, "web-1")), ["Started"]);
        let told = Told::of(&status);
        assert!(told_by(&told, &status, "web-1").is_empty(), "nothing new");

        status.pre_actions[0] = action("check", ActionPhase::Failed, Some(4));
        let events = told_by(&told, &status, "web-1");
        assert_eq!(reasons(&events), ["ActionFailed"]);
        assert_eq!(events[0].type_, EventType::Warning);
        assert_eq!(
            events[0].note,
            "pre action check failed with exit code 4: disk on fire"
        );
        assert_eq!(events[0].action, "RunPreAction1");
        let told = Told::of(&status);
        assert!(told_by(&told, &status, "web-1").is_empty());

        status.reboot = Some(RebootRecord {
            state: RebootState::InProgress,
            requested_by: Some("patches".into()),
            ..Default::default()
        });
        status.phase = JobPhase::Rebooting;
        let events = told_by(&told, &status, "web-1");
        assert_eq!(reasons(&events), ["Rebooting"]);
        assert!(events[0].note.contains("requested by patches"));
        let told = Told::of(&status);

        status.reboot.as_mut().unwrap().state = RebootState::Completed;
        status.phase = JobPhase::Failed;
        status.message = "action check failed".into();
        let events = told_by(&told, &status, "web-1");
        assert_eq!(reasons(&events), ["RebootCompleted", "Failed"]);
        assert_eq!(events[1].note, "action check failed");
        assert!(told_by(&Told::of(&status), &status, "web-1").is_empty());
    }

    #[test]
    fn what_coalescing_skipped_is_still_told_in_order() {
        let status = PatchJobStatus {
            phase: JobPhase::Succeeded,
            post_actions: vec![action("after", ActionPhase::TimedOut, None)],
            reboot: Some(RebootRecord {
                state: RebootState::Completed,
                ..Default::default()
            }),
            message: "succeeded after a reboot".into(),
            ..Default::default()
        };
        let events = told_by(&Told::default(), &status, "web-1");
        assert_eq!(
            reasons(&events),
            [
                "Started",
                "ActionFailed",
                "Rebooting",
                "RebootCompleted",
                "Succeeded"
            ]
        );
        assert!(events[1].note.starts_with("post action after timed out"));
    }

    #[test]
    fn notes_fit_the_api_servers_limit() {
        let long = "é".repeat(2000);
        let bounded = bounded_note(long);
        assert!(bounded.len() <= MAX_NOTE_BYTES && bounded.ends_with('…'));
        assert_eq!(bounded_note("short".into()), "short");
    }

    #[test]
    fn a_reboot_left_out_says_why() {
        let status = PatchJobStatus {
            phase: JobPhase::Succeeded,
            reboot: Some(RebootRecord {
                state: RebootState::RequiredNotPerformed,
                requested_by: Some("policy".into()),
                ..Default::default()
            }),
            message:
                "succeeded; a reboot is required but was not performed: start it with --allow-reboot"
                    .into(),
            ..Default::default()
        };
        let told = Told {
            phase: JobPhase::Running,
            ..Default::default()
        };
        let events = told_by(&told, &status, "web-1");
        assert_eq!(reasons(&events), ["RebootNotPerformed", "Succeeded"]);
        assert_eq!(
            events[0].note,
            "a reboot is required (requested by policy) but was not performed: start it with --allow-reboot"
        );
    }
}
