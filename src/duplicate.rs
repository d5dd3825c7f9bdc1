//! `fleetpatch duplicate`: copies a Workflow, Task or Script under a new name into a
//! namespace of one's own, to edit there — the way to build on the read-only built-in
//! library. A copy is never a default workflow. A shallow copy keeps referring to what
//! the original uses (which must then be in the copy's namespace or the library's); a
//! deep copy takes the tasks and scripts along, renamed with a prefix, so the copy owns
//! everything it runs. The copy is created, or printed for a GitOps repository.

use std::collections::BTreeMap;

use anyhow::Context;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;

use crate::api::common::{BUILTIN_LABEL, NamespacedKind, ObjectRef};
use crate::api::rules::{DEFAULT_LIBRARY_NAMESPACE, Missing};
use crate::api::{Script, Task, Workflow};

/// Annotation on a copy: what it was copied from (`Kind namespace/name`).
pub const DUPLICATED_FROM_ANNOTATION: &str = "fleetpatch.io/duplicated-from";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Workflow,
    Task,
    Script,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct DuplicateOptions {
    /// What to copy.
    #[arg(value_enum)]
    pub kind: Kind,
    /// Name of the object to copy.
    pub source: String,
    /// Name of the copy.
    pub new_name: String,
    /// Namespace the copy is made in.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Namespace of the object to copy [default: the built-in library's].
    #[arg(long)]
    pub from_namespace: Option<String>,
    /// Copy the tasks and scripts it uses too, named PREFIX and their own name.
    #[arg(long)]
    pub deep: bool,
    /// Prefix of the names of deep copies [default: NEW_NAME-].
    #[arg(long, requires = "deep")]
    pub prefix: Option<String>,
    /// Namespace of the built-in library, which a shallow copy may keep referring to.
    #[arg(long, default_value = DEFAULT_LIBRARY_NAMESPACE)]
    pub library_namespace: String,
    /// Print the manifests instead of creating them.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Format>,
}

/// What to copy, where to, and how.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: Kind,
    pub source: String,
    pub from_namespace: String,
    pub new_name: String,
    pub namespace: String,
    pub library_namespace: String,
    /// `Some(prefix)` for a deep copy.
    pub deep: Option<String>,
}

impl From<&DuplicateOptions> for Request {
    fn from(options: &DuplicateOptions) -> Self {
        Self {
            kind: options.kind,
            source: options.source.clone(),
            from_namespace: options
                .from_namespace
                .clone()
                .unwrap_or_else(|| options.library_namespace.clone()),
            new_name: options.new_name.clone(),
            namespace: options.namespace.clone(),
            library_namespace: options.library_namespace.clone(),
            deep: options.deep.then(|| {
                options
                    .prefix
                    .clone()
                    .unwrap_or_else(|| format!("{}-", options.new_name))
            }),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DuplicateError {
    #[error(transparent)]
    NotFound(Missing),
    #[error(
        "{kind} {namespace}/{name} is used by the original, but a copy in namespace {target} may refer only to its own namespace and to {library}: add --deep to copy it as well"
    )]
    Unreachable {
        kind: &'static str,
        namespace: String,
        name: String,
        target: String,
        library: String,
    },
    #[error(
        "{0:?} is not a valid name for the copy (lower-case letters, digits, '-' and '.', at most 253)"
    )]
    BadName(String),
}

/// The objects a copy may be made of, by namespace and name.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub workflows: BTreeMap<(String, String), Workflow>,
    pub tasks: BTreeMap<(String, String), Task>,
    pub scripts: BTreeMap<(String, String), Script>,
}

/// The objects a copy consists of, in the order they are created: what is referred to
/// before what refers to it.
#[derive(Clone, Debug, Default)]
pub struct Copy {
    pub scripts: Vec<Script>,
    pub tasks: Vec<Task>,
    pub workflows: Vec<Workflow>,
}

impl Copy {
    /// Every object as JSON, with its apiVersion and kind.
    pub fn manifests(&self) -> Vec<serde_json::Value> {
        fn with_type<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> serde_json::Value {
            let mut value = serde_json::to_value(object).expect("objects serialize");
            value["apiVersion"] = K::api_version(&()).into();
            value["kind"] = K::kind(&()).into();
            value
        }
        self.scripts
            .iter()
            .map(with_type)
            .chain(self.tasks.iter().map(with_type))
            .chain(self.workflows.iter().map(with_type))
            .collect()
    }
}

fn not_found(kind: &'static str, namespace: &str, name: &str) -> DuplicateError {
    DuplicateError::NotFound(Missing {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

fn check_name(name: &str) -> Result<(), DuplicateError> {
    if crate::manifests::is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(DuplicateError::BadName(name.into()))
    }
}

/// The copy's metadata: its name and namespace, the original's labels but the built-in
/// one, and where it came from.
fn metadata(original: &ObjectMeta, kind: &str, name: &str, namespace: &str) -> ObjectMeta {
    let mut labels = original.labels.clone().unwrap_or_default();
    labels.remove(BUILTIN_LABEL);
    let from = format!(
        "{kind} {}/{}",
        original.namespace.as_deref().unwrap_or_default(),
        original.name.as_deref().unwrap_or_default()
    );
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: (!labels.is_empty()).then_some(labels),
        annotations: Some(BTreeMap::from([(
            DUPLICATED_FROM_ANNOTATION.to_string(),
            from,
        )])),
        ..Default::default()
    }
}

/// Builds the copy from `sources` (which must hold the original and, for a deep copy,
/// everything it uses).
pub fn plan_copy(sources: &Sources, request: &Request) -> Result<Copy, DuplicateError> {
    check_name(&request.new_name)?;
    let mut copier = Copier {
        sources,
        request,
        copy: Copy::default(),
    };
    let from = request.from_namespace.as_str();
    match request.kind {
        Kind::Workflow => copier.workflow(from, &request.source, &request.new_name)?,
        Kind::Task => {
            copier.task(from, &request.source, &request.new_name)?;
        }
        Kind::Script => {
            copier.script(from, &request.source, &request.new_name)?;
        }
    }
    Ok(copier.copy)
}

struct Copier<'a> {
    sources: &'a Sources,
    request: &'a Request,
    copy: Copy,
}

impl Copier<'_> {
    /// What a reference of the copy says: to the deep copy of what it named, or, for a
    /// shallow copy, to the same object, if the copy's namespace may refer to it.
    fn reference(
        &mut self,
        kind: &'static str,
        reference: &ObjectRef,
        referrer_namespace: &str,
    ) -> Result<ObjectRef, DuplicateError> {
        let namespace = reference.namespace_or(referrer_namespace).to_string();
        let request = self.request;
        if let Some(prefix) = &request.deep {
            let name = format!("{prefix}{}", reference.name);
            match kind {
                "Task" => self.task(&namespace, &reference.name, &name)?,
                _ => self.script(&namespace, &reference.name, &name)?,
            };
            return Ok(ObjectRef::new(name));
        }
        if namespace == request.namespace {
            Ok(ObjectRef::new(&reference.name))
        } else if namespace == request.library_namespace {
            Ok(ObjectRef {
                name: reference.name.clone(),
                namespace: Some(namespace),
            })
        } else {
            Err(DuplicateError::Unreachable {
                kind,
                namespace,
                name: reference.name.clone(),
                target: request.namespace.clone(),
                library: request.library_namespace.clone(),
            })
        }
    }

    fn workflow(
        &mut self,
        namespace: &str,
        name: &str,
        new_name: &str,
    ) -> Result<(), DuplicateError> {
        let original = self
            .sources
            .workflows
            .get(&(namespace.into(), name.into()))
            .ok_or_else(|| not_found("Workflow", namespace, name))?;
        let mut spec = original.spec.clone();
        spec.default = false;
        for step in spec.pre_tasks.iter_mut().chain(spec.post_tasks.iter_mut()) {
            step.task_ref = self.reference("Task", &step.task_ref, namespace)?;
        }
        let mut copy = Workflow::new(new_name, spec);
        copy.metadata = metadata(
            &original.metadata,
            "Workflow",
            new_name,
            &self.request.namespace,
        );
        self.copy.workflows.push(copy);
        Ok(())
    }

    fn task(&mut self, namespace: &str, name: &str, new_name: &str) -> Result<(), DuplicateError> {
        check_name(new_name)?;
        if self.copy.tasks.iter().any(|t| t.name_any() == new_name) {
            return Ok(()); // used twice: copied once
        }
        let original = self
            .sources
            .tasks
            .get(&(namespace.into(), name.into()))
            .ok_or_else(|| not_found("Task", namespace, name))?;
        let mut spec = original.spec.clone();
        if let Some(run) = &mut spec.run_script {
            run.script_ref = self.reference("Script", &run.script_ref, namespace)?;
        }
        if let Some(install) = &mut spec.install_software {
            install.install_script_ref =
                self.reference("Script", &install.install_script_ref, namespace)?;
            if let Some(detection) = &install.detection_script_ref {
                install.detection_script_ref =
                    Some(self.reference("Script", detection, namespace)?);
            }
        }
        let mut copy = Task::new(new_name, spec);
        copy.metadata = metadata(
            &original.metadata,
            "Task",
            new_name,
            &self.request.namespace,
        );
        self.copy.tasks.push(copy);
        Ok(())
    }

    fn script(
        &mut self,
        namespace: &str,
        name: &str,
        new_name: &str,
    ) -> Result<(), DuplicateError> {
        check_name(new_name)?;
        if self.copy.scripts.iter().any(|s| s.name_any() == new_name) {
            return Ok(());
        }
        let original = self
            .sources
            .scripts
            .get(&(namespace.into(), name.into()))
            .ok_or_else(|| not_found("Script", namespace, name))?;
        let mut copy = Script::new(new_name, original.spec.clone());
        copy.metadata = metadata(
            &original.metadata,
            "Script",
            new_name,
            &self.request.namespace,
        );
        self.copy.scripts.push(copy);
        Ok(())
    }
}

/// Reads the original, and for a deep copy everything it uses, from the cluster.
async fn gather(client: &Client, request: &Request) -> anyhow::Result<Sources> {
    async fn get<K>(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Option<K>>
    where
        K: NamespacedKind,
    {
        Api::<K>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
            .with_context(|| format!("reading {} {namespace}/{name}", K::kind(&())))
    }
    let mut sources = Sources::default();
    let from = request.from_namespace.clone();
    let mut tasks: Vec<(String, String)> = Vec::new();
    let mut scripts: Vec<(String, String)> = Vec::new();
    match request.kind {
        Kind::Workflow => {
            if let Some(workflow) = get::<Workflow>(client, &from, &request.source).await? {
                for step in workflow
                    .spec
                    .pre_tasks
                    .iter()
                    .chain(&workflow.spec.post_tasks)
                {
                    let reference = &step.task_ref;
                    tasks.push((reference.namespace_or(&from).into(), reference.name.clone()));
                }
                sources
                    .workflows
                    .insert((from.clone(), request.source.clone()), workflow);
            }
        }
        Kind::Task => tasks.push((from.clone(), request.source.clone())),
        Kind::Script => scripts.push((from.clone(), request.source.clone())),
    }
    let deep = request.deep.is_some();
    if request.kind == Kind::Task || deep {
        for (namespace, name) in tasks {
            let Some(task) = get::<Task>(client, &namespace, &name).await? else {
                continue;
            };
            let spec = &task.spec;
            let used = spec.run_script.iter().map(|run| &run.script_ref).chain(
                spec.install_software.iter().flat_map(|install| {
                    std::iter::once(&install.install_script_ref)
                        .chain(install.detection_script_ref.iter())
                }),
            );
            for reference in used {
                scripts.push((
                    reference.namespace_or(&namespace).into(),
                    reference.name.clone(),
                ));
            }
            sources.tasks.insert((namespace, name), task);
        }
    }
    if request.kind == Kind::Script || deep {
        for (namespace, name) in scripts {
            if let Some(script) = get::<Script>(client, &namespace, &name).await? {
                sources.scripts.insert((namespace, name), script);
            }
        }
    }
    Ok(sources)
}

/// Creates every object of the copy, after checking that none of them exists yet.
async fn create(client: &Client, copy: &Copy) -> anyhow::Result<()> {
    async fn create_all<K>(
        client: &Client,
        objects: &[K],
        plan_only: bool,
    ) -> anyhow::Result<Vec<String>>
    where
        K: NamespacedKind,
    {
        let mut done = Vec::new();
        for object in objects {
            let namespace = object.namespace().unwrap_or_default();
            let api = Api::<K>::namespaced(client.clone(), &namespace);
            let shown = format!("{} {namespace}/{}", K::kind(&()), object.name_any());
            if plan_only {
                if api.get_opt(&object.name_any()).await?.is_some() {
                    done.push(shown);
                }
            } else {
                api.create(&PostParams::default(), object)
                    .await
                    .with_context(|| format!("creating {shown}"))?;
                done.push(shown);
            }
        }
        Ok(done)
    }
    let mut taken = create_all(client, &copy.scripts, true).await?;
    taken.extend(create_all(client, &copy.tasks, true).await?);
    taken.extend(create_all(client, &copy.workflows, true).await?);
    if !taken.is_empty() {
        anyhow::bail!(
            "nothing was created: {} already exist(s); choose another name{}",
            taken.join(", "),
            if copy.tasks.len() + copy.scripts.len() > 0 {
                " or --prefix"
            } else {
                ""
            }
        );
    }
    for created in create_all(client, &copy.scripts, false)
        .await?
        .into_iter()
        .chain(create_all(client, &copy.tasks, false).await?)
        .chain(create_all(client, &copy.workflows, false).await?)
    {
        println!("{created} created");
    }
    Ok(())
}

/// `fleetpatch duplicate`.
pub async fn run(options: &DuplicateOptions) -> anyhow::Result<()> {
    let request = Request::from(options);
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let sources = gather(&client, &request).await?;
    let copy = plan_copy(&sources, &request)?;
    match options.output {
        Some(Format::Yaml) => {
            for manifest in copy.manifests() {
                print!("---\n{}", serde_yaml_ng::to_string(&manifest)?);
            }
        }
        Some(Format::Json) => {
            let list =
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": copy.manifests()});
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        None => create(&client, &copy).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::library::Library;

    const LIBRARY: &str = DEFAULT_LIBRARY_NAMESPACE;

    /// The built-in library as the source.
    fn library() -> Sources {
        let library = Library::load(LIBRARY);
        let key = |meta: &ObjectMeta| (meta.namespace.clone().unwrap(), meta.name.clone().unwrap());
        Sources {
            workflows: library
                .workflows
                .into_iter()
                .map(|o| (key(&o.metadata), o))
                .collect(),
            tasks: library
                .tasks
                .into_iter()
                .map(|o| (key(&o.metadata), o))
                .collect(),
            scripts: library
                .scripts
                .into_iter()
                .map(|o| (key(&o.metadata), o))
                .collect(),
        }
    }

    fn request(kind: Kind, source: &str, deep: Option<&str>) -> Request {
        Request {
            kind,
            source: source.into(),
            from_namespace: LIBRARY.into(),
            new_name: "my-linux".into(),
            namespace: "team-a".into(),
            library_namespace: LIBRARY.into(),
            deep: deep.map(String::from),
        }
    }

    #[test]
    fn a_shallow_copy_of_a_library_workflow_refers_to_the_library_and_is_no_default() {
        let copy = plan_copy(&library(), &request(Kind::Workflow, "linux-default", None)).unwrap();
        assert!(copy.tasks.is_empty() && copy.scripts.is_empty());
        let [workflow] = copy.workflows.as_slice() else {
            panic!("{copy:?}")
        };
        assert_eq!(workflow.name_any(), "my-linux");
        assert_eq!(workflow.namespace().as_deref(), Some("team-a"));
        assert!(!workflow.spec.default, "a copy is never a default");
        assert!(!workflow.labels().contains_key(BUILTIN_LABEL));
        assert_eq!(
            workflow.annotations()[DUPLICATED_FROM_ANNOTATION],
            format!("Workflow {LIBRARY}/linux-default")
        );
        assert_eq!(
            workflow.spec.post_tasks[0].task_ref,
            ObjectRef {
                name: "linux-check-reboot-required".into(),
                namespace: Some(LIBRARY.into())
            }
        );
    }

    #[test]
    fn a_deep_copy_takes_every_task_and_script_along_renamed() {
        let sources = library();
        let copy = plan_copy(
            &sources,
            &request(Kind::Workflow, "linux-default", Some("mine-")),
        )
        .unwrap();
        let workflow = &copy.workflows[0];
        let original = &sources.workflows[&(LIBRARY.to_string(), "linux-default".to_string())];
        assert_eq!(
            workflow.spec.post_tasks.len(),
            original.spec.post_tasks.len()
        );
        for (step, was) in workflow
            .spec
            .post_tasks
            .iter()
            .zip(&original.spec.post_tasks)
        {
            assert_eq!(
                step.task_ref,
                ObjectRef::new(format!("mine-{}", was.task_ref.name))
            );
            assert!(
                copy.tasks
                    .iter()
                    .any(|t| t.name_any() == step.task_ref.name)
            );
        }
        for task in &copy.tasks {
            assert_eq!(task.namespace().as_deref(), Some("team-a"));
            if let Some(run) = &task.spec.run_script {
                assert!(run.script_ref.namespace.is_none());
                let script = copy
                    .scripts
                    .iter()
                    .find(|s| s.name_any() == run.script_ref.name)
                    .expect("the script is copied too");
                assert!(script.name_any().starts_with("mine-"));
                assert!(!script.labels().contains_key(BUILTIN_LABEL));
            }
        }
        assert!(
            !copy.scripts.is_empty(),
            "the library's reboot checks are scripts"
        );
        // Everything the copy refers to is in the copy: it validates on its own.
        let yaml: String = copy
            .manifests()
            .iter()
            .map(|m| format!("---\n{}", serde_yaml_ng::to_string(m).unwrap()))
            .collect();
        let documents = crate::manifests::split(std::path::Path::new("copy.yaml"), &yaml);
        let report = crate::manifests::check(
            &documents,
            &crate::manifests::Schemas::new(),
            &crate::manifests::CheckOptions::default(),
        );
        assert!(report.problems.is_empty(), "{:?}\n{yaml}", report.problems);
        assert_eq!(report.checked, copy.manifests().len());
    }

    #[test]
    fn a_shallow_copy_cannot_refer_to_another_teams_namespace() {
        let mut sources = library();
        let (key, mut workflow) = sources.workflows.pop_first().unwrap();
        workflow.metadata.namespace = Some("team-b".into());
        sources
            .workflows
            .insert(("team-b".into(), key.1.clone()), workflow);
        let mut asked = request(Kind::Workflow, &key.1, None);
        asked.from_namespace = "team-b".into();
        let err = plan_copy(&sources, &asked).unwrap_err();
        assert!(
            matches!(err, DuplicateError::Unreachable { ref namespace, .. } if namespace == "team-b"),
            "{err}"
        );
        assert!(err.to_string().contains("add --deep"), "{err}");
    }

    #[test]
    fn what_does_not_exist_or_cannot_be_named_is_said() {
        assert_eq!(
            plan_copy(&library(), &request(Kind::Workflow, "nope", None)).unwrap_err(),
            not_found("Workflow", LIBRARY, "nope")
        );
        let mut bad = request(Kind::Script, "linux-check-reboot-required", None);
        bad.new_name = "Not_A_Name".into();
        assert!(matches!(
            plan_copy(&library(), &bad),
            Err(DuplicateError::BadName(_))
        ));
    }
}
