//! Resolution of a Workflow into the frozen actions of a PatchJob: each Task with its
//! Scripts inlined (body and SHA-256), parameters merged with the scripts' defaults.
//! The controller and `fleetpatch agent exec` both build jobs with this.

use std::collections::BTreeMap;

use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::common::ObjectRef;
use super::patchjob::{
    PatchJobSpec, ResolvedAction, ResolvedDownload, ResolvedLimits, ResolvedScript,
};
use super::plan::{PatchSelection, RebootPolicy};
use super::rules::{Catalog, Problem, RefError};
use super::script::Script;
use super::task::{ActionLimits, Task, TaskType, parse_max_memory};
use super::workflow::{Workflow, WorkflowStep};

/// Lower-case hex SHA-256 of a script body, as stored in `Script.status.sha256` and in jobs.
pub fn content_sha256(content: &str) -> String {
    hex::encode(Sha256::digest(content.as_bytes()))
}

/// Why a workflow could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("Workflow {0} not found")]
    WorkflowNotFound(String),
    #[error("{field}: {source}")]
    Reference {
        field: String,
        #[source]
        source: RefError,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("the workflow breaks {} rule(s): {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Rules(Vec<Problem>),
    /// The host's package manager cannot install what the plan selects.
    #[error("spec.patches.classifications: {0}")]
    Unsupported(String),
}

impl ResolveError {
    /// Short category for Events and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::WorkflowNotFound(_) => "WorkflowNotFound",
            Self::Reference { .. } => "ReferenceNotFound",
            Self::Rules(_) | Self::Invalid { .. } => "InvalidWorkflow",
            Self::Unsupported(_) => "ClassificationNotSupported",
        }
    }
}

/// What a job is for, besides its actions.
#[derive(Clone, Debug)]
pub struct JobTarget {
    pub agent: String,
    pub plan: String,
    pub run: String,
    pub patches: PatchSelection,
    pub reboot: RebootPolicy,
}

/// Resolves `workflow` (already found in `catalog`) into a PatchJob spec. The workflow,
/// its tasks and their scripts must pass the cross-object rules.
pub fn resolve_job(
    catalog: &Catalog,
    workflow: &Workflow,
    target: JobTarget,
) -> Result<PatchJobSpec, ResolveError> {
    let namespace = workflow.namespace().unwrap_or_else(|| "default".into());
    let mut problems = catalog.check_workflow(workflow);
    let resolve_steps = |steps: &[WorkflowStep], phase: &str, problems: &mut Vec<Problem>| {
        let mut actions = Vec::new();
        for (index, step) in steps.iter().enumerate() {
            let field = format!("spec.{phase}[{index}].taskRef");
            let task = catalog.task(&step.task_ref, &namespace).map_err(|source| {
                ResolveError::Reference {
                    field: field.clone(),
                    source,
                }
            })?;
            problems.extend(catalog.check_task(task));
            actions.push(resolve_action(catalog, task)?);
        }
        Ok::<_, ResolveError>(actions)
    };
    let pre_actions = resolve_steps(&workflow.spec.pre_tasks, "preTasks", &mut problems)?;
    let post_actions = resolve_steps(&workflow.spec.post_tasks, "postTasks", &mut problems)?;
    if !problems.is_empty() {
        return Err(ResolveError::Rules(problems));
    }
    Ok(PatchJobSpec {
        agent: target.agent,
        plan: target.plan,
        run: target.run,
        os: workflow.spec.os,
        workflow: Some(ObjectRef {
            name: workflow.name_any(),
            namespace: Some(namespace),
        }),
        pre_actions,
        post_actions,
        failure_policy: workflow.spec.failure_policy.clone(),
        patches: target.patches,
        reboot: target.reboot,
        deadline: None,
        node: None,
    })
}

/// Finds a workflow by name in `namespace` (or the library) and resolves it.
pub fn resolve_named(
    catalog: &Catalog,
    namespace: &str,
    name: &str,
    target: JobTarget,
) -> Result<PatchJobSpec, ResolveError> {
    let workflow = catalog
        .workflow(&ObjectRef::new(name), namespace)
        .ok()
        .or_else(|| {
            catalog
                .workflow(&ObjectRef::new(name), &catalog.library_namespace)
                .ok()
        })
        .ok_or_else(|| ResolveError::WorkflowNotFound(format!("{namespace}/{name}")))?;
    resolve_job(catalog, workflow, target)
}

fn resolve_script(script: &Script) -> ResolvedScript {
    ResolvedScript {
        source: ObjectRef {
            name: script.name_any(),
            namespace: script.namespace(),
        },
        language: script.spec.language,
        content: script.spec.content.clone(),
        sha256: content_sha256(&script.spec.content),
        signature: script.spec.signature.clone(),
    }
}

/// Parameters as the scripts will see them: the scripts' defaults, overridden by the task's values.
fn merged_parameters(
    scripts: &[&Script],
    values: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut merged = BTreeMap::new();
    for script in scripts {
        for parameter in &script.spec.parameters {
            if let Some(default) = &parameter.default {
                merged
                    .entry(parameter.name.clone())
                    .or_insert_with(|| default.clone());
            }
        }
    }
    merged.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged
}

fn resolve_action(catalog: &Catalog, task: &Task) -> Result<ResolvedAction, ResolveError> {
    let namespace = task.namespace().unwrap_or_else(|| "default".into());
    let spec = &task.spec;
    let lookup = |reference: &ObjectRef, field: &str| {
        catalog
            .script(reference, &namespace)
            .map_err(|source| ResolveError::Reference {
                field: format!("Task {}: {field}", task.name_any()),
                source,
            })
    };
    let mut action = ResolvedAction {
        name: task.name_any(),
        task: ObjectRef {
            name: task.name_any(),
            namespace: Some(namespace.clone()),
        },
        action_type: spec.task_type,
        timeout_minutes: spec.timeout_minutes,
        success_exit_codes: spec.success_exit_codes.clone(),
        parameters: BTreeMap::new(),
        bypass_execution_policy: false,
        script: None,
        detection_script: None,
        download: None,
        change_registry_key: spec.change_registry_key.clone(),
        uninstall_software: spec.uninstall_software.clone(),
        reboot: spec.reboot.clone(),
        limits: resolve_limits(spec.limits.as_ref()).map_err(|source| ResolveError::Invalid {
            field: format!("Task {}: spec.limits.maxMemory", task.name_any()),
            message: source,
        })?,
    };
    match spec.task_type {
        TaskType::RunScript => {
            if let Some(run) = &spec.run_script {
                let script = lookup(&run.script_ref, "spec.runScript.scriptRef")?;
                action.parameters = merged_parameters(&[script], &run.parameters);
                action.bypass_execution_policy = run.bypass_execution_policy;
                action.script = Some(resolve_script(script));
            }
        }
        TaskType::InstallSoftware => {
            if let Some(install) = &spec.install_software {
                let installer = lookup(
                    &install.install_script_ref,
                    "spec.installSoftware.installScriptRef",
                )?;
                let detection = match &install.detection_script_ref {
                    Some(reference) => Some(lookup(
                        reference,
                        "spec.installSoftware.detectionScriptRef",
                    )?),
                    None => None,
                };
                let scripts: Vec<&Script> = detection.into_iter().chain([installer]).collect();
                action.parameters = merged_parameters(&scripts, &install.parameters);
                action.bypass_execution_policy = install.bypass_execution_policy;
                action.script = Some(resolve_script(installer));
                action.detection_script = detection.map(resolve_script);
                action.download = Some(ResolvedDownload {
                    source: install.source.clone(),
                    sha256: install.sha256.to_ascii_lowercase(),
                    file_name: install
                        .file_name
                        .clone()
                        .unwrap_or_else(|| default_file_name(&install.source)),
                });
            }
        }
        TaskType::ChangeRegistryKey | TaskType::UninstallSoftware | TaskType::Reboot => {}
    }
    Ok(action)
}

/// The last path segment of the URL or share path, without a query string.
/// A Task's limits in bytes; `maxMemory` out of range is refused here as in `validate`.
fn resolve_limits(limits: Option<&ActionLimits>) -> Result<Option<ResolvedLimits>, String> {
    let Some(limits) = limits else {
        return Ok(None);
    };
    Ok(Some(ResolvedLimits {
        max_memory_bytes: limits
            .max_memory
            .as_deref()
            .map(parse_max_memory)
            .transpose()?,
        cpu_weight: limits.cpu_weight,
    }))
}

fn default_file_name(source: &super::task::DownloadSource) -> String {
    let location = source
        .url
        .as_deref()
        .or(source.unc.as_deref())
        .unwrap_or_default();
    let location = location.split(['?', '#']).next().unwrap_or_default();
    location
        .rsplit(['/', '\\'])
        .find(|segment| !segment.is_empty())
        .filter(|name| *name != "." && *name != "..")
        .unwrap_or("download")
        .to_string()
}

/// The built-in `linux-default` workflow resolved in namespace `x` for agent `a` of
/// plan `p`'s run `r`: a real job spec, scripts and all, for tests.
#[cfg(test)]
pub(crate) fn linux_default_spec() -> PatchJobSpec {
    use super::library::Library;
    use super::rules::DEFAULT_LIBRARY_NAMESPACE;
    let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
    Library::load(DEFAULT_LIBRARY_NAMESPACE).add_to(&mut catalog);
    let target = JobTarget {
        agent: "a".into(),
        plan: "p".into(),
        run: "r".into(),
        patches: Default::default(),
        reboot: Default::default(),
    };
    resolve_named(&catalog, "x", "linux-default", target).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::library::Library;
    use crate::api::rules::DEFAULT_LIBRARY_NAMESPACE;
    use crate::api::task::{DownloadProtocol, DownloadSource};

    fn target() -> JobTarget {
        JobTarget {
            agent: "host-1".into(),
            plan: String::new(),
            run: String::new(),
            patches: PatchSelection::default(),
            reboot: RebootPolicy::IfRequired,
        }
    }

    #[test]
    fn the_default_linux_workflow_resolves_with_inlined_scripts() {
        let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
        Library::load(DEFAULT_LIBRARY_NAMESPACE).add_to(&mut catalog);
        let spec = resolve_named(&catalog, "team", "linux-default", target()).unwrap();
        assert_eq!(spec.pre_actions.len(), 0);
        let names: Vec<&str> = spec.post_actions.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            ["linux-check-reboot-required", "linux-reboot-if-required"]
        );
        let script = spec.post_actions[0].script.as_ref().unwrap();
        assert_eq!(script.sha256, content_sha256(&script.content));
        assert_eq!(spec.post_actions[1].action_type, TaskType::Reboot);
        assert!(
            spec.post_actions[1]
                .reboot
                .as_ref()
                .unwrap()
                .only_if_required
        );
    }

    #[test]
    fn file_names_come_from_the_location() {
        let https = DownloadSource {
            protocol: DownloadProtocol::Https,
            url: Some("https://x.example/a/b/setup.exe?token=1".into()),
            unc: None,
        };
        assert_eq!(default_file_name(&https), "setup.exe");
        let share = DownloadSource {
            protocol: DownloadProtocol::NetworkShare,
            url: None,
            unc: Some(r"\\srv\share\pkg.msi".into()),
        };
        assert_eq!(default_file_name(&share), "pkg.msi");
    }

    #[test]
    fn sha256_is_lower_case_hex() {
        assert_eq!(
            content_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
