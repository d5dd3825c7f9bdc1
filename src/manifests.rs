//! Manifest files as a GitOps repository holds them, and the offline checks
//! `fleetpatch validate` runs on them: the CRD schema (as an API server would check it
//! at `kubectl apply`), the CEL rules, and the rules that span objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kube::core::cel::{CompiledSchema, Validator, compile_schema};
use serde::Deserialize;
use serde_json::Value;

use crate::api::common::{API_GROUP, GROUP_VERSION};
use crate::api::library::Library;
use crate::api::rules::{Catalog, Problem as RuleProblem};
use crate::api::{self, RemediationPlan, Script, Task, Workflow};
use crate::structural;

/// One YAML document of one file.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub index: usize,
    pub content: Result<Value, String>,
}

/// A file or directory that could not be read at all (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads every `.yaml`/`.yml`/`.json` file under `paths` (directories recursively, in
/// name order) and splits them into documents. Empty documents are dropped.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Document>, ReadError> {
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, true, &mut files)?;
    }
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ReadError {
            path: file.clone(),
            source,
        })?;
        documents.extend(split(&file, &text));
    }
    Ok(documents)
}

fn collect_files(path: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> Result<(), ReadError> {
    let read_error = |source| ReadError {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(read_error)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            collect_files(&entry, false, out)?;
        }
    } else if explicit
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
    {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Splits multi-document YAML. A syntax error ends the file: YAML cannot resynchronise.
pub fn split(file: &Path, text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    for (position, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let index = position + 1;
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => documents.push(Document {
                file: file.to_path_buf(),
                index,
                content: Ok(value),
            }),
            Err(err) => {
                documents.push(Document {
                    file: file.to_path_buf(),
                    index,
                    content: Err(err.to_string()),
                });
                break;
            }
        }
    }
    documents
}

/// One problem, printed as `FILE:DOC Kind/name: field.path: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub document: usize,
    /// `Kind/name`, or `-` when the document has no usable kind or name.
    pub object: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} {}: {}: {}",
            self.file.display(),
            self.document,
            self.object,
            self.field,
            self.message
        )
    }
}

/// Result of checking a set of documents.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// Documents that were not checked, and why (other API groups).
    pub notes: Vec<String>,
    /// fleetpatch objects that passed every check.
    pub checked: usize,
    /// Every valid object plus the built-in library, for resolving workflows.
    pub catalog: Catalog,
}

/// The kinds of `fleetpatch.io/v1alpha1` with their schemas, compiled once.
pub struct Schemas {
    kinds: BTreeMap<String, KindSchema>,
    validator: Validator,
}

struct KindSchema {
    namespaced: bool,
    schema: Value,
    compiled: CompiledSchema,
}

impl Default for Schemas {
    fn default() -> Self {
        Self::new()
    }
}

impl Schemas {
    pub fn new() -> Self {
        let kinds = api::crds()
            .into_iter()
            .map(|crd| {
                let version = &crd.spec.versions[0];
                let schema = serde_json::to_value(
                    version
                        .schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref())
                        .expect("derived CRDs have a schema"),
                )
                .expect("schema serializes");
                let compiled = compile_schema(&schema);
                let kind = KindSchema {
                    namespaced: crd.spec.scope == "Namespaced",
                    schema,
                    compiled,
                };
                (crd.spec.names.kind.clone(), kind)
            })
            .collect();
        Self {
            kinds,
            validator: Validator::new(),
        }
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// Schema and CEL checks of one object, as `(field path, message)` pairs.
    /// `Err` when the kind is not one of ours.
    pub fn check_object(
        &self,
        kind: &str,
        object: &Value,
        old: Option<&Value>,
    ) -> Result<Vec<(String, String)>, String> {
        let schema = self.kinds.get(kind).ok_or_else(|| {
            format!(
                "unknown kind {kind:?} in {GROUP_VERSION}; known kinds: {}",
                self.kinds.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let mut problems: Vec<(String, String)> = check_metadata(object, schema.namespaced);
        let errors = structural::validate(&schema.schema, object, structural::Options::default());
        problems.extend(errors.iter().map(|e| (e.path.clone(), e.message())));
        if problems.is_empty()
            && let Err(errors) = self
                .validator
                .validate_compiled(&schema.compiled, object, old)
        {
            problems.extend(
                errors
                    .iter()
                    .map(|e| (e.field_path.clone(), e.message.clone())),
            );
        }
        Ok(problems)
    }
}

/// The parts of `meta/v1 ObjectMeta` a manifest may carry, as a structural schema.
fn object_meta_schema() -> &'static Value {
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let strings = serde_json::json!({"type": "object", "additionalProperties": {"type": "string"}});
        let string = serde_json::json!({"type": "string"});
        serde_json::json!({
            "type": "object",
            "properties": {
                "name": string, "generateName": string, "namespace": string, "uid": string,
                "resourceVersion": string, "selfLink": string,
                "generation": {"type": "integer"},
                "creationTimestamp": {"type": "string", "nullable": true},
                "deletionTimestamp": {"type": "string", "nullable": true},
                "deletionGracePeriodSeconds": {"type": "integer"},
                "labels": strings, "annotations": strings,
                "finalizers": {"type": "array", "items": string},
                "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }
        })
    })
}

fn check_metadata(object: &Value, namespaced: bool) -> Vec<(String, String)> {
    let metadata = &object["metadata"];
    if metadata.is_null() {
        return vec![(
            "metadata".into(),
            "Required value: every object needs metadata with a name".into(),
        )];
    }
    let mut problems: Vec<(String, String)> = structural::validate_at(
        object_meta_schema(),
        metadata,
        "metadata",
        structural::Options::default(),
    )
    .iter()
    .map(|e| (e.path.clone(), e.message()))
    .collect();
    if !problems.is_empty() {
        return problems;
    }
    match metadata["name"].as_str() {
        None => problems.push(("metadata.name".into(), "Required value: every object needs a name".into())),
        Some(name) if !is_dns_subdomain(name) => problems.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be lower-case letters, digits, '-' and '.', start and end with a letter or digit, at most 253 characters"),
        )),
        Some(_) => {}
    }
    if let Some(namespace) = metadata.get("namespace") {
        match namespace.as_str() {
            Some(ns) if !namespaced => problems.push((
                "metadata.namespace".into(),
                format!("Invalid value: {ns:?}: this kind is cluster-scoped and has no namespace"),
            )),
            Some(ns) if !is_dns_label(ns) => problems.push((
                "metadata.namespace".into(),
                format!("Invalid value: {ns:?}: must be a DNS label (lower-case letters, digits and '-', at most 63 characters)"),
            )),
            Some(_) => {}
            None => problems.push(("metadata.namespace".into(), "must be a string".into())),
        }
    }
    problems
}

/// RFC 1123 subdomain, as Kubernetes requires for most object names.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(|part| is_label_chars(part, 253))
}

/// RFC 1123 label, as Kubernetes requires for namespaces.
pub fn is_dns_label(name: &str) -> bool {
    is_label_chars(name, 63)
}

fn is_label_chars(part: &str, max: usize) -> bool {
    let bytes = part.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Options of an offline check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Namespace of the built-in library, whose objects are added to what is checked.
    pub library_namespace: String,
    /// Namespace for objects that name none.
    pub default_namespace: String,
    /// Package managers the plans' hosts patch with (see `Catalog::patchers`).
    pub patchers: Vec<String>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            library_namespace: api::rules::DEFAULT_LIBRARY_NAMESPACE.to_string(),
            default_namespace: "default".to_string(),
            patchers: Vec::new(),
        }
    }
}

type Origin = (PathBuf, usize);

type ObjectKey = (String, String, String);

/// Checks documents one by one against the schemas, then all together against the
/// rules that span objects.
pub fn check(documents: &[Document], schemas: &Schemas, options: &CheckOptions) -> Report {
    let mut report = Report::default();
    let mut catalog = Catalog::new(options.library_namespace.clone());
    catalog.patchers = options.patchers.clone();
    Library::load(&options.library_namespace).add_to(&mut catalog);
    let mut origins: BTreeMap<ObjectKey, Origin> = BTreeMap::new();
    let mut clean = 0usize;
    for document in documents {
        match admit(document, schemas, options, &mut catalog, &origins) {
            Admission::Added(key) => {
                origins.insert(key, (document.file.clone(), document.index));
                clean += 1;
            }
            Admission::Ignored(note) => report.notes.push(note),
            Admission::Refused { object, problems } => {
                report
                    .problems
                    .extend(problems.into_iter().map(|(field, message)| Problem {
                        file: document.file.clone(),
                        document: document.index,
                        object: object.clone(),
                        field,
                        message,
                    }))
            }
        }
    }
    let failing = spanning_problems(&catalog, &origins, &mut report.problems);
    report.checked = clean - failing;
    report.catalog = catalog;
    report
}

/// What became of one document.
enum Admission {
    /// Valid, in the catalog under this key.
    Added(ObjectKey),
    /// Not a fleetpatch.io object: a note says so.
    Ignored(String),
    /// Problems as (field, message), on the object labelled `Kind/name` (or `-`).
    Refused {
        object: String,
        problems: Vec<(String, String)>,
    },
}

impl Admission {
    fn refused(object: &str, field: &str, message: impl Into<String>) -> Self {
        Admission::Refused {
            object: object.to_string(),
            problems: vec![(field.to_string(), message.into())],
        }
    }
}

/// A document's apiVersion and kind, once it is known to be a fleetpatch.io object
/// of the version this release serves.
struct Identity<'a> {
    kind: &'a str,
    name: &'a str,
    label: String,
}

fn identify(document: &Document) -> Result<(&Value, Identity<'_>), Admission> {
    let value = match &document.content {
        Ok(value) => value,
        Err(message) => {
            return Err(Admission::refused(
                "-",
                "yaml",
                format!("not valid YAML: {message}"),
            ));
        }
    };
    if !value.is_object() {
        return Err(Admission::refused(
            "-",
            "(document)",
            "must be a mapping with apiVersion, kind and metadata",
        ));
    }
    let kind = value["kind"].as_str();
    let name = value["metadata"]["name"].as_str().unwrap_or("-");
    let label = format!("{}/{}", kind.unwrap_or("-"), name);
    let Some(api_version) = value["apiVersion"].as_str() else {
        return Err(Admission::refused(
            &label,
            "apiVersion",
            "Required value: every object needs an apiVersion",
        ));
    };
    let Some(kind) = kind else {
        return Err(Admission::refused(
            &label,
            "kind",
            "Required value: every object needs a kind",
        ));
    };
    let group = api_version
        .rsplit_once('/')
        .map(|(group, _)| group)
        .unwrap_or("");
    if group != API_GROUP {
        return Err(Admission::Ignored(format!(
            "{}:{} {label}: ignored: {api_version} is not a fleetpatch.io API",
            document.file.display(),
            document.index
        )));
    }
    if api_version != GROUP_VERSION {
        return Err(Admission::refused(
            &label,
            "apiVersion",
            format!("Unsupported value: {api_version:?}: this release serves only {GROUP_VERSION}"),
        ));
    }
    Ok((value, Identity { kind, name, label }))
}

/// Checks one document against its kind's schema and, when it passes and names an
/// object not defined before, adds it to the catalog. An object that fails its schema
/// is recorded as invalid, so the rules that span objects do not blame its referrers
/// for a missing target.
fn admit(
    document: &Document,
    schemas: &Schemas,
    options: &CheckOptions,
    catalog: &mut Catalog,
    origins: &BTreeMap<ObjectKey, Origin>,
) -> Admission {
    let (value, Identity { kind, name, label }) = match identify(document) {
        Ok(identified) => identified,
        Err(admission) => return admission,
    };
    let problems = match schemas.check_object(kind, value, None) {
        Ok(problems) => problems,
        Err(message) => return Admission::refused(&label, "kind", message),
    };
    let namespace = value["metadata"]["namespace"]
        .as_str()
        .unwrap_or(&options.default_namespace)
        .to_string();
    let key = (kind.to_string(), namespace.clone(), name.to_string());
    if !problems.is_empty() {
        catalog.invalid.insert(key);
        return Admission::Refused {
            object: label,
            problems,
        };
    }
    if let Some((file, index)) = origins.get(&key) {
        return Admission::refused(
            &label,
            "metadata.name",
            format!(
                "duplicate: {kind} {namespace}/{name} is also defined at {}:{index}",
                file.display()
            ),
        );
    }
    let mut value = value.clone();
    if schemas.kinds[kind].namespaced {
        value["metadata"]["namespace"] = Value::String(namespace);
    }
    match add_to_catalog(catalog, kind, value) {
        Ok(()) => Admission::Added(key),
        Err(err) => Admission::refused(
            &label,
            "(object)",
            format!("does not match the API types: {err}"),
        ),
    }
}

fn add_to_catalog(catalog: &mut Catalog, kind: &str, value: Value) -> serde_json::Result<()> {
    match kind {
        "Script" => serde_json::from_value::<Script>(value).map(|o| catalog.add_script(o)),
        "Task" => serde_json::from_value::<Task>(value).map(|o| catalog.add_task(o)),
        "Workflow" => serde_json::from_value::<Workflow>(value).map(|o| catalog.add_workflow(o)),
        "RemediationPlan" => {
            serde_json::from_value::<RemediationPlan>(value).map(|o| catalog.add_plan(o))
        }
        _ => Ok(()),
    }
}

/// The problems of the rules that span objects, on the documents that define them;
/// returns how many objects have one.
fn spanning_problems(
    catalog: &Catalog,
    origins: &BTreeMap<ObjectKey, Origin>,
    problems: &mut Vec<Problem>,
) -> usize {
    let mut failing = std::collections::BTreeSet::new();
    for RuleProblem {
        kind,
        namespace,
        name,
        field,
        message,
    } in catalog.check_all()
    {
        let key = (kind.to_string(), namespace, name.clone());
        let Some((file, index)) = origins.get(&key) else {
            continue; // a problem of the built-in library itself is caught by its own test
        };
        problems.push(Problem {
            file: file.clone(),
            document: *index,
            object: format!("{kind}/{name}"),
            field,
            message,
        });
        failing.insert(key);
    }
    failing.len()
}
