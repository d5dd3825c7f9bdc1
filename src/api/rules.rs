//! Rules that span objects: references resolve, operating systems agree, a Reboot task
//! comes last, Internal scripts stay out of workflows, one default workflow per OS,
//! and scripts parse. Pure functions over a [`Catalog`]; the controller and
//! `fleetpatch validate` both call them.

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::common::{ObjectRef, OperatingSystem};
use super::plan::RemediationPlan;
use super::script::{Script, ScriptCategory, ScriptLanguage};
use super::syntax;
use super::task::{Task, TaskType};
use super::workflow::Workflow;

/// Namespace of the built-in library when the controller is not told otherwise.
pub const DEFAULT_LIBRARY_NAMESPACE: &str = "fleetpatch-system";

/// Limits the controller may tighten below the API's hard caps.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_pre_tasks: usize,
    pub max_post_tasks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pre_tasks: super::common::WORKFLOW_TASKS_MAX,
            max_post_tasks: super::common::WORKFLOW_TASKS_MAX,
        }
    }
}

/// Key of a namespaced object.
pub type Key = (String, String);

fn key_of<K: ResourceExt>(object: &K) -> Key {
    (
        object.namespace().unwrap_or_else(|| "default".into()),
        object.name_any(),
    )
}

/// Everything the rules may look at: the objects of one or more namespaces plus the
/// built-in library.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub library_namespace: String,
    pub limits: Limits,
    pub scripts: BTreeMap<Key, Script>,
    pub tasks: BTreeMap<Key, Task>,
    pub workflows: BTreeMap<Key, Workflow>,
    pub plans: BTreeMap<Key, RemediationPlan>,
    /// Package managers the plans' hosts patch with (`validate --patcher`): a plan
    /// selecting what one of them cannot install is refused. Empty: hosts unknown.
    pub patchers: Vec<String>,
    /// Objects that exist but failed their own checks, as (kind, namespace, name):
    /// references to them say so instead of "does not exist".
    pub invalid: std::collections::BTreeSet<(String, String, String)>,
}

/// One broken rule, on one object and field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Field path, e.g. `spec.postTasks[1].taskRef`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}: {}: {}",
            self.kind, self.name, self.field, self.message
        )
    }
}

/// An object a reference names that is not there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name} does not exist")]
pub struct Missing {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// Why a reference does not resolve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error(transparent)]
    NotFound(Missing),
    #[error(
        "may not name namespace {namespace}: references stay in their own namespace or point into the built-in library namespace {library}"
    )]
    ForeignNamespace { namespace: String, library: String },
}

/// Whether `object` is part of the built-in library (labelled so by the controller,
/// which alone may write the label).
fn is_builtin<K: kube::Resource>(object: &K) -> bool {
    object
        .meta()
        .labels
        .as_ref()
        .and_then(|labels| labels.get(super::common::BUILTIN_LABEL))
        .is_some_and(|value| value == "true")
}

impl Catalog {
    pub fn new(library_namespace: impl Into<String>) -> Self {
        Self {
            library_namespace: library_namespace.into(),
            ..Self::default()
        }
    }

    pub fn add_script(&mut self, script: Script) {
        self.scripts.insert(key_of(&script), script);
    }
    pub fn add_task(&mut self, task: Task) {
        self.tasks.insert(key_of(&task), task);
    }
    pub fn add_workflow(&mut self, workflow: Workflow) {
        self.workflows.insert(key_of(&workflow), workflow);
    }
    pub fn add_plan(&mut self, plan: RemediationPlan) {
        self.plans.insert(key_of(&plan), plan);
    }

    fn target_namespace(
        &self,
        reference: &ObjectRef,
        referrer_namespace: &str,
    ) -> Result<String, RefError> {
        match &reference.namespace {
            Some(ns) if ns != referrer_namespace && *ns != self.library_namespace => {
                Err(RefError::ForeignNamespace {
                    namespace: ns.clone(),
                    library: self.library_namespace.clone(),
                })
            }
            _ => Ok(reference.namespace_or(referrer_namespace).to_string()),
        }
    }

    /// The object `reference` names. Seen from another namespace, the library namespace
    /// holds only the built-in library: what else is kept there is not the library.
    fn lookup<'a, T: kube::Resource>(
        &self,
        objects: &'a BTreeMap<Key, T>,
        kind: &'static str,
        reference: &ObjectRef,
        referrer_namespace: &str,
    ) -> Result<&'a T, RefError> {
        let namespace = self.target_namespace(reference, referrer_namespace)?;
        let key = (namespace, reference.name.clone());
        objects
            .get(&key)
            .filter(|object| key.0 == referrer_namespace || is_builtin(*object))
            .ok_or(RefError::NotFound(Missing {
                kind,
                namespace: key.0,
                name: key.1,
            }))
    }

    pub fn script(
        &self,
        reference: &ObjectRef,
        referrer_namespace: &str,
    ) -> Result<&Script, RefError> {
        self.lookup(&self.scripts, "Script", reference, referrer_namespace)
    }
    pub fn task(&self, reference: &ObjectRef, referrer_namespace: &str) -> Result<&Task, RefError> {
        self.lookup(&self.tasks, "Task", reference, referrer_namespace)
    }
    pub fn workflow(
        &self,
        reference: &ObjectRef,
        referrer_namespace: &str,
    ) -> Result<&Workflow, RefError> {
        self.lookup(&self.workflows, "Workflow", reference, referrer_namespace)
    }

    /// The default workflow for `os` seen from `namespace`: the namespace's own default,
    /// else the built-in library's.
    pub fn default_workflow(&self, namespace: &str, os: OperatingSystem) -> Option<&Workflow> {
        let default_in = |ns: &str, builtin_only: bool| {
            self.workflows
                .iter()
                .filter(|((wns, _), wf)| wns == ns && wf.spec.default && wf.spec.os == os)
                .map(|(_, wf)| wf)
                .filter(|wf| !builtin_only || is_builtin(*wf))
                .min_by_key(|wf| wf.name_any())
        };
        default_in(namespace, false).or_else(|| default_in(&self.library_namespace, true))
    }

    /// Every problem in the catalog, sorted by object.
    pub fn check_all(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for script in self.scripts.values() {
            problems.extend(check_script(script));
        }
        for task in self.tasks.values() {
            problems.extend(self.check_task(task));
        }
        for workflow in self.workflows.values() {
            problems.extend(self.check_workflow(workflow));
        }
        problems.extend(self.check_default_workflows());
        for plan in self.plans.values() {
            problems.extend(self.check_plan(plan));
        }
        problems
    }

    /// References of a Task resolve, the scripts suit the task's OS, parameters are
    /// declared and complete, and registry data fits its type.
    pub fn check_task(&self, task: &Task) -> Vec<Problem> {
        let (namespace, name) = key_of(task);
        let problem = |field: &str, message: String| Problem {
            kind: "Task",
            namespace: namespace.clone(),
            name: name.clone(),
            field: field.to_string(),
            message,
        };
        let mut problems = Vec::new();
        let spec = &task.spec;
        let mut script_fields: Vec<(&ObjectRef, &str)> = Vec::new();
        let mut parameters = None;
        if let Some(run) = &spec.run_script {
            script_fields.push((&run.script_ref, "spec.runScript.scriptRef"));
            parameters = Some((&run.parameters, "spec.runScript.parameters"));
        }
        if let Some(install) = &spec.install_software {
            if let Some(detection) = &install.detection_script_ref {
                script_fields.push((detection, "spec.installSoftware.detectionScriptRef"));
            }
            script_fields.push((
                &install.install_script_ref,
                "spec.installSoftware.installScriptRef",
            ));
            parameters = Some((&install.parameters, "spec.installSoftware.parameters"));
        }
        let mut resolved = Vec::new();
        for (reference, field) in script_fields {
            match self.script(reference, &namespace) {
                Err(err) => problems.push(problem(field, err.to_string())),
                Ok(script) => {
                    if !language_fits(script.spec.language, spec.os) {
                        problems.push(problem(
                            field,
                            format!(
                                "Script {} is {} but the task is for {}",
                                reference.name,
                                script.spec.language.as_str(),
                                spec.os
                            ),
                        ));
                    }
                    resolved.push(script);
                }
            }
        }
        if let Some((values, field)) = parameters {
            for key in values.keys() {
                if !resolved.is_empty()
                    && !resolved
                        .iter()
                        .any(|s| s.spec.parameters.iter().any(|p| &p.name == key))
                {
                    problems.push(problem(
                        &format!("{field}.{key}"),
                        "no script of this task declares this parameter".to_string(),
                    ));
                }
            }
            for script in &resolved {
                for declared in &script.spec.parameters {
                    if declared.required
                        && declared.default.is_none()
                        && !values.contains_key(&declared.name)
                    {
                        problems.push(problem(
                            field,
                            format!(
                                "Script {} requires parameter {} and it has no default",
                                script.name_any(),
                                declared.name
                            ),
                        ));
                    }
                }
            }
        }
        problems
    }

    /// A Workflow's tasks exist, suit its OS, use no Internal script, stay within the
    /// limits, and a Reboot task comes last.
    pub fn check_workflow(&self, workflow: &Workflow) -> Vec<Problem> {
        let (namespace, name) = key_of(workflow);
        let problem = |field: String, message: String| Problem {
            kind: "Workflow",
            namespace: namespace.clone(),
            name: name.clone(),
            field,
            message,
        };
        let mut problems = Vec::new();
        let spec = &workflow.spec;
        for (steps, phase, limit) in [
            (&spec.pre_tasks, "preTasks", self.limits.max_pre_tasks),
            (&spec.post_tasks, "postTasks", self.limits.max_post_tasks),
        ] {
            if steps.len() > limit {
                problems.push(problem(
                    format!("spec.{phase}"),
                    format!(
                        "has {} tasks; this controller allows at most {limit}",
                        steps.len()
                    ),
                ));
            }
        }
        let steps = spec
            .pre_tasks
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("spec.preTasks[{i}].taskRef"), s))
            .chain(
                spec.post_tasks
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("spec.postTasks[{i}].taskRef"), s)),
            );
        let total = spec.pre_tasks.len() + spec.post_tasks.len();
        for (position, (field, step)) in steps.enumerate() {
            let task = match self.task(&step.task_ref, &namespace) {
                Ok(task) => task,
                Err(err) => {
                    problems.push(problem(field, err.to_string()));
                    continue;
                }
            };
            if task.spec.os != spec.os {
                problems.push(problem(
                    field.clone(),
                    format!(
                        "Task {} is for {} but the workflow is for {}",
                        step.task_ref.name, task.spec.os, spec.os
                    ),
                ));
            }
            if task.spec.task_type == TaskType::Reboot && position + 1 != total {
                problems.push(problem(
                    field.clone(),
                    format!(
                        "Reboot task {} must be the last task of the workflow",
                        step.task_ref.name
                    ),
                ));
            }
            let task_namespace = key_of(task).0;
            for script_ref in task.spec.script_refs() {
                if let Ok(script) = self.script(script_ref, &task_namespace)
                    && script.spec.category == ScriptCategory::Internal
                {
                    problems.push(problem(
                        field.clone(),
                        format!(
                            "Task {} uses Internal-category Script {}, which cannot be used in a workflow",
                            step.task_ref.name, script_ref.name
                        ),
                    ));
                }
            }
        }
        problems
    }

    /// At most one default workflow per OS and namespace; every one of a conflicting set is reported.
    pub fn check_default_workflows(&self) -> Vec<Problem> {
        let mut defaults: BTreeMap<(String, OperatingSystem), Vec<String>> = BTreeMap::new();
        for ((namespace, name), workflow) in &self.workflows {
            if workflow.spec.default {
                defaults
                    .entry((namespace.clone(), workflow.spec.os))
                    .or_default()
                    .push(name.clone());
            }
        }
        let mut problems = Vec::new();
        for ((namespace, os), names) in defaults.into_iter().filter(|(_, names)| names.len() > 1) {
            for name in &names {
                let others: Vec<&str> = names
                    .iter()
                    .filter(|n| *n != name)
                    .map(String::as_str)
                    .collect();
                problems.push(Problem {
                    kind: "Workflow",
                    namespace: namespace.clone(),
                    name: name.clone(),
                    field: "spec.default".into(),
                    message: format!(
                        "only one default workflow per OS is allowed; {} is also the default for {os} in namespace {namespace}",
                        others.join(", ")
                    ),
                });
            }
        }
        problems
    }

    /// A plan's workflows exist and suit each target's OS.
    pub fn check_plan(&self, plan: &RemediationPlan) -> Vec<Problem> {
        let (namespace, name) = key_of(plan);
        let mut problems = Vec::new();
        if let Some(schedule) = &plan.spec.schedule
            && let Err(err) = super::schedule::ParsedSchedule::parse(schedule)
        {
            let field = match err {
                super::schedule::ScheduleError::Cron { .. } => "spec.schedule.cron",
                super::schedule::ScheduleError::TimeZone(_) => "spec.schedule.timeZone",
            };
            problems.push(Problem {
                kind: "RemediationPlan",
                namespace: namespace.clone(),
                name: name.clone(),
                field: field.into(),
                message: err.to_string(),
            });
        }
        for (index, target) in plan.spec.targets.iter().enumerate() {
            let Some(reference) = &target.workflow_ref else {
                continue;
            };
            let field = format!("spec.targets[{index}].workflowRef");
            let message = match self.workflow(reference, &namespace) {
                Err(err) => err.to_string(),
                Ok(workflow) if workflow.spec.os != target.os => format!(
                    "Workflow {} is for {} but target {} is {}",
                    reference.name, workflow.spec.os, target.name, target.os
                ),
                Ok(_) => continue,
            };
            problems.push(Problem {
                kind: "RemediationPlan",
                namespace: namespace.clone(),
                name: name.clone(),
                field,
                message,
            });
        }
        for patcher in &self.patchers {
            let os = patcher_os(patcher);
            if !plan.spec.targets.iter().any(|target| Some(target.os) == os) {
                continue;
            }
            if let Some(message) = plan.spec.patches.refusal_on(patcher) {
                problems.push(Problem {
                    kind: "RemediationPlan",
                    namespace: namespace.clone(),
                    name: name.clone(),
                    field: "spec.patches.classifications".into(),
                    message,
                });
            }
        }
        problems
    }
}

/// Package managers an agent patches with, by name, and the OS they run on.
pub const PATCHERS: [(&str, OperatingSystem); 5] = [
    ("apt", OperatingSystem::Linux),
    ("dnf", OperatingSystem::Linux),
    ("yum", OperatingSystem::Linux),
    ("zypper", OperatingSystem::Linux),
    ("windows-update", OperatingSystem::Windows),
];

fn patcher_os(patcher: &str) -> Option<OperatingSystem> {
    PATCHERS
        .iter()
        .find(|(name, _)| *name == patcher)
        .map(|(_, os)| *os)
}

/// Whether scripts in `language` can run on `os`.
pub fn language_fits(language: ScriptLanguage, os: OperatingSystem) -> bool {
    matches!(
        (language, os),
        (ScriptLanguage::PowerShell, OperatingSystem::Windows)
            | (
                ScriptLanguage::Bash | ScriptLanguage::Sh,
                OperatingSystem::Linux
            )
    )
}

/// Syntax problems of one Script.
pub fn check_script(script: &Script) -> Vec<Problem> {
    let diagnostics = syntax::check(script.spec.language, &script.spec.content);
    if diagnostics.is_empty() {
        return Vec::new();
    }
    let (namespace, name) = key_of(script);
    vec![Problem {
        kind: "Script",
        namespace,
        name,
        field: "spec.content".into(),
        message: format!(
            "{} syntax error: {}",
            script.spec.language.as_str(),
            syntax::describe(&diagnostics)
        ),
    }]
}
