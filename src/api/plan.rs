//! `RemediationPlan`: which hosts get which patches and which workflow, when, and how
//! fast the rollout goes.

use k8s_openapi::apimachinery::pkg::{
    apis::meta::v1::{Condition, LabelSelector, Time},
    util::intstr::IntOrString,
};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::{OperatingSystem, WorkflowRef};

/// A group of hosts and the workflow they get.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanTarget {
    /// Name of the group, unique within the plan.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Agents whose labels match. An empty selector matches every Agent of the OS.
    #[serde(default)]
    pub selector: LabelSelector,
    pub os: OperatingSystem,
    /// Workflow for this group; without it the default workflow for the OS is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<WorkflowRef>,
    /// Higher priorities are patched first.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("priority must be between 0 and 1000"))]
    pub priority: i32,
}

/// Patch classifications a plan can select.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PatchClassification {
    Security,
    Critical,
    Bugfix,
    All,
}

/// When the patch step of a job counts as failed.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PatchFailWhen {
    /// Only when patches were wanted and none installed (JetPatch): some installed and
    /// some failed is a success that lists the failures, with the job's
    /// `PatchesPartiallyFailed` condition.
    #[default]
    AllFailed,
    /// As soon as one wanted patch failed.
    AnyFailed,
}

/// Why `patcher` cannot honour `classifications` as its package manager defines them,
/// if it cannot. A classification is never widened to mean more: apt marks security
/// updates only (by their `-security` suite) and records no severity, so Bugfix is
/// refused on apt, and Critical unless Security is selected with it (apt's Critical
/// would be all its Security updates, which Security already selects). dnf and yum take
/// the advisory types (security with severity Critical, bugfix), zypper the patch
/// categories (security with severity critical, recommended), Windows Update the
/// category IDs; each honours every classification.
pub fn classification_refusal(
    patcher: &str,
    classifications: &[PatchClassification],
) -> Option<String> {
    if patcher != "apt" {
        return None;
    }
    let has = |c| classifications.contains(&c);
    let refused = if has(PatchClassification::Bugfix) {
        PatchClassification::Bugfix
    } else if has(PatchClassification::Critical) && !has(PatchClassification::Security) {
        PatchClassification::Critical
    } else {
        return None;
    };
    Some(format!(
        "apt cannot select {refused:?} updates: apt marks only security updates (those from a -security suite) and records neither severity nor bug fixes; select Security or All, or name the packages in include"
    ))
}

fn default_classifications() -> Vec<PatchClassification> {
    vec![PatchClassification::Security, PatchClassification::Critical]
}

/// Which patches to deploy.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!('All' in self.classifications) || size(self.classifications) == 1")
        .message("All cannot be combined with other classifications").field_path(".classifications"),
)]
pub struct PatchSelection {
    #[serde(default = "default_classifications")]
    #[schemars(length(min = 1, max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub classifications: Vec<PatchClassification>,
    /// Package or KB names always included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub include: Vec<String>,
    /// Package or KB names never installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub exclude: Vec<String>,
    /// Run only the workflow's actions, install no patches.
    #[serde(default)]
    pub skip: bool,
    /// When the patch step fails: `AllFailed` (default) only when none of the wanted
    /// patches installed, `AnyFailed` as soon as one did not.
    #[serde(default)]
    pub fail_when: PatchFailWhen,
}

impl PatchSelection {
    /// Why `patcher` cannot install what this selection asks for, if it cannot
    /// ([`classification_refusal`]). A selection that installs nothing is never refused.
    pub fn refusal_on(&self, patcher: &str) -> Option<String> {
        if self.skip {
            return None;
        }
        classification_refusal(patcher, &self.classifications)
    }
}

impl Default for PatchSelection {
    fn default() -> Self {
        Self {
            classifications: default_classifications(),
            include: vec![],
            exclude: vec![],
            skip: false,
            fail_when: PatchFailWhen::default(),
        }
    }
}

fn default_window_minutes() -> u32 {
    240
}

/// When runs start.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// Five-field cron expression: minute hour day-of-month month day-of-week.
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(r"self.matches('^\\s*\\S+(\\s+\\S+){4}\\s*$')")
        .message("cron must have five fields: minute hour day-of-month month day-of-week"))]
    pub cron: String,
    /// IANA time zone the cron expression is read in, e.g. Europe/Berlin. Defaults to UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
    /// Jobs start only within this many minutes after the scheduled time.
    #[serde(default = "default_window_minutes")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10080").message("windowMinutes must be between 1 and 10080 (one week)"))]
    pub window_minutes: u32,
}

fn default_max_concurrent() -> IntOrString {
    IntOrString::Int(10)
}

fn default_max_failures() -> IntOrString {
    IntOrString::Int(0)
}

/// How fast a run proceeds and when it halts.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// Most jobs running at once: a count or a percentage of the run's hosts.
    #[serde(default = "default_max_concurrent")]
    #[x_kube(validation = Rule::new("string(self).matches('^([1-9][0-9]*|[1-9][0-9]?%|100%)$')")
        .message("maxConcurrent must be a positive count or a percentage from 1% to 100%"))]
    pub max_concurrent: IntOrString,
    /// Failures tolerated before the run halts: a count or a percentage of the run's hosts.
    #[serde(default = "default_max_failures")]
    #[x_kube(validation = Rule::new("string(self).matches('^([0-9]+|[0-9]{1,2}%|100%)$')")
        .message("maxFailures must be a count of zero or more or a percentage from 0% to 100%"))]
    pub max_failures: IntOrString,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_concurrent: default_max_concurrent(),
            max_failures: default_max_failures(),
        }
    }
}

/// Whether hosts reboot after patching.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RebootPolicy {
    /// Reboot once when a patch or an action asks for it.
    #[default]
    IfRequired,
    /// Never reboot; record that a reboot is pending.
    Never,
    /// Reboot once after patching even if nothing asked for it.
    Always,
}

fn default_max_concurrent_nodes() -> u32 {
    1
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebootSettings {
    #[serde(default)]
    pub policy: RebootPolicy,
    /// Most cluster nodes of this plan rebooting at once.
    #[serde(default = "default_max_concurrent_nodes")]
    #[x_kube(validation = Rule::new("self >= 1").message("maxConcurrentNodes must be at least 1"))]
    pub max_concurrent_nodes: u32,
    /// How a cluster node is drained before it reboots.
    #[serde(default)]
    pub drain: DrainSettings,
}

impl Default for RebootSettings {
    fn default() -> Self {
        Self {
            policy: RebootPolicy::default(),
            max_concurrent_nodes: default_max_concurrent_nodes(),
            drain: DrainSettings::default(),
        }
    }
}

fn default_drain_timeout_seconds() -> u32 {
    600
}

/// Draining a cluster node before its reboot: the node is cordoned and its pods are
/// evicted through the eviction API, so PodDisruptionBudgets hold. DaemonSet pods and
/// static (mirror) pods always stay.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainSettings {
    /// Seconds to wait for the pods to leave; then the reboot is called off, the node
    /// uncordoned and the job fails.
    #[serde(default = "default_drain_timeout_seconds")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("timeoutSeconds must be between 1 and 86400 (one day)"))]
    pub timeout_seconds: u32,
    /// Pods matching this selector are left running (besides DaemonSet and static pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_pod_selector: Option<LabelSelector>,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            timeout_seconds: default_drain_timeout_seconds(),
            ignore_pod_selector: None,
        }
    }
}

fleetpatch_kind! {
    /// Which hosts, which patches, which workflow, when and how fast.
    #[kube(
        kind = "RemediationPlan",
        namespaced,
        status = "RemediationPlanStatus",
        shortname = "rplan",
        doc = "Which hosts get which patches and workflow, when, and how fast the rollout goes.",
        printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule.cron"),
        printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
        printcolumn(name = "Run", type_ = "string", json_path = ".status.currentRun.id"),
        printcolumn(
            name = "Phase",
            type_ = "string",
            json_path = ".status.currentRun.phase"
        ),
        printcolumn(
            name = "Succeeded",
            type_ = "integer",
            json_path = ".status.currentRun.counts.succeeded"
        ),
        printcolumn(
            name = "Failed",
            type_ = "integer",
            json_path = ".status.currentRun.counts.failed"
        ),
        printcolumn(
            name = "Hosts",
            type_ = "integer",
            json_path = ".status.currentRun.counts.total"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )]
    pub struct RemediationPlanSpec {
        /// Host groups, each with its selector, OS, workflow and priority.
        #[schemars(length(min = 1, max = 50))]
        #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
        pub targets: Vec<PlanTarget>,
        #[serde(default)]
        pub patches: PatchSelection,
        /// Without a schedule the plan runs only on demand (`fleetpatch run plan NAME`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub schedule: Option<Schedule>,
        #[serde(default)]
        pub rollout: Rollout,
        #[serde(default)]
        pub reboot: RebootSettings,
        /// Jobs that have not started by this many minutes after the run began end as Unknown.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[x_kube(validation = Rule::new("self >= 1 && self <= 10080").message("jobDeadlineMinutes must be between 1 and 10080"))]
        pub job_deadline_minutes: Option<u32>,
        /// Stop starting new runs and new jobs; running jobs finish.
        #[serde(default)]
        pub suspend: bool,
    }
}

/// Observed state of a RemediationPlan.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemediationPlanStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_run: Option<PlanRun>,
    /// Finished runs, newest first (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_runs: Vec<PlanRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// Value of the `fleetpatch.io/run-requested` annotation last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Job counts of one run, by phase.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunCounts {
    pub total: i32,
    pub pending: i32,
    pub running: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub unknown: i32,
    /// Hosts selected but skipped because their Agent is paused.
    pub paused: i32,
    /// Hosts selected but skipped because their Agent does not accept plans from this
    /// plan's namespace (`spec.allowedPlans`).
    #[serde(default)]
    pub not_permitted: i32,
}

/// Phase of one plan run.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    Running,
    /// Failures exceeded maxFailures; no new job starts.
    Halted,
    Succeeded,
    Failed,
}

/// One failed host, kept in a bounded list.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunFailure {
    pub agent: String,
    pub job: String,
    pub reason: String,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRun {
    /// Run identifier, also part of every job name of the run.
    pub id: String,
    pub phase: RunPhase,
    pub start_time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    pub counts: RunCounts,
    /// The first failures of the run (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<RunFailure>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use PatchClassification::{All, Bugfix, Critical, Security};

    #[test]
    fn fail_when_defaults_to_all_failed_and_reads_from_the_plan() {
        let selection: PatchSelection = serde_json::from_str("{}").unwrap();
        assert_eq!(selection.fail_when, PatchFailWhen::AllFailed);
        let selection: PatchSelection =
            serde_json::from_str(r#"{"failWhen": "AnyFailed"}"#).unwrap();
        assert_eq!(selection.fail_when, PatchFailWhen::AnyFailed);
        assert!(serde_json::from_str::<PatchSelection>(r#"{"failWhen": "Sometimes"}"#).is_err());
    }

    #[test]
    fn apt_refuses_what_it_cannot_tell_apart_and_others_honour_every_classification() {
        let refused = |patcher: &str, classes: &[PatchClassification]| {
            classification_refusal(patcher, classes).is_some()
        };
        for classes in [
            &[Bugfix][..],
            &[Critical],
            &[Critical, Bugfix],
            &[Security, Bugfix],
        ] {
            assert!(refused("apt", classes), "apt {classes:?}");
        }
        for classes in [&[Security][..], &[Security, Critical], &[All]] {
            assert!(!refused("apt", classes), "apt {classes:?}");
        }
        for patcher in ["dnf", "yum", "zypper", "windows-update"] {
            for classes in [
                &[Bugfix][..],
                &[Critical],
                &[Security, Critical, Bugfix],
                &[All],
            ] {
                assert!(!refused(patcher, classes), "{patcher} {classes:?}");
            }
        }
        let message = classification_refusal("apt", &[Bugfix]).unwrap();
        assert!(
            message.starts_with("apt cannot select Bugfix updates"),
            "{message}"
        );
        let skipped = PatchSelection {
            classifications: vec![Bugfix],
            skip: true,
            ..PatchSelection::default()
        };
        assert_eq!(skipped.refusal_on("apt"), None, "nothing is installed");
    }
}
