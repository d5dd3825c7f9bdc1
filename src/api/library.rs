//! The built-in library: read-only Scripts, Tasks and Workflows (reboot for every OS,
//! check-reboot-required, the default Windows and Linux workflows) that the controller
//! installs into its own namespace.

use serde::Deserialize;

use super::common::BUILTIN_LABEL;
use super::rules::Catalog;
use super::{Script, Task, Workflow};

const BUILTIN_YAML: &str = include_str!("../../library/builtin.yaml");

/// The built-in objects, each placed in `namespace` and labelled as built-in.
#[derive(Clone, Debug, Default)]
pub struct Library {
    pub scripts: Vec<Script>,
    pub tasks: Vec<Task>,
    pub workflows: Vec<Workflow>,
}

impl Library {
    pub fn load(namespace: &str) -> Self {
        let mut library = Library::default();
        for document in serde_yaml_ng::Deserializer::from_str(BUILTIN_YAML) {
            let value =
                serde_json::Value::deserialize(document).expect("built-in library is valid YAML");
            let kind = value["kind"]
                .as_str()
                .expect("built-in objects have a kind")
                .to_string();
            match kind.as_str() {
                "Script" => library.scripts.push(place(value, namespace)),
                "Task" => library.tasks.push(place(value, namespace)),
                "Workflow" => library.workflows.push(place(value, namespace)),
                other => panic!("unexpected kind {other} in the built-in library"),
            }
        }
        library
    }

    /// Adds every built-in object to `catalog`.
    pub fn add_to(&self, catalog: &mut Catalog) {
        self.scripts
            .iter()
            .cloned()
            .for_each(|s| catalog.add_script(s));
        self.tasks.iter().cloned().for_each(|t| catalog.add_task(t));
        self.workflows
            .iter()
            .cloned()
            .for_each(|w| catalog.add_workflow(w));
    }
}

fn place<K: serde::de::DeserializeOwned + kube::Resource>(
    value: serde_json::Value,
    namespace: &str,
) -> K {
    let mut object: K = serde_json::from_value(value).expect("built-in objects match their schema");
    let meta = object.meta_mut();
    meta.namespace = Some(namespace.to_string());
    meta.labels
        .get_or_insert_default()
        .insert(BUILTIN_LABEL.to_string(), "true".to_string());
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OperatingSystem;
    use crate::api::rules::DEFAULT_LIBRARY_NAMESPACE;

    #[test]
    fn the_library_passes_every_rule_and_has_defaults_for_both_systems() {
        let library = Library::load(DEFAULT_LIBRARY_NAMESPACE);
        let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
        library.add_to(&mut catalog);
        assert_eq!(catalog.check_all(), vec![]);
        for os in [OperatingSystem::Linux, OperatingSystem::Windows] {
            let default = catalog
                .default_workflow("team-a", os)
                .expect("a default workflow");
            assert_eq!(default.spec.os, os);
        }
        assert!(
            library
                .scripts
                .iter()
                .all(|s| s.metadata.labels.as_ref().unwrap()[BUILTIN_LABEL] == "true")
        );
    }
}

#[cfg(test)]
mod library_impostors {
    use super::*;
    use crate::api::OperatingSystem;
    use crate::api::rules::DEFAULT_LIBRARY_NAMESPACE;
    use kube::ResourceExt;

    /// Attack (anyone who may create Scripts, Tasks and Workflows in the controller's
    /// namespace — the very people the admission policy is there to stop): the policy
    /// denies changes only to objects labelled `fleetpatch.io/builtin=true`, but the
    /// catalog treats *every* object in the library namespace as the library. Creating a
    /// new, unlabelled Workflow `aaa-linux` with `default: true` there is allowed, and
    /// since the library's default is the alphabetically first default, it replaces the
    /// built-in Linux default for every namespace without its own — every plan without
    /// a workflowRef, in every team, then runs the impostor's tasks (and an unlabelled
    /// Script or Task there is reachable by any cross-namespace reference too). The
    /// library is what the controller installed: lookups into it must see only
    /// built-in objects (or the policy must refuse any other object in that namespace).
    #[test]
    fn an_unlabelled_workflow_in_the_library_namespace_does_not_become_the_library_default() {
        let library = Library::load(DEFAULT_LIBRARY_NAMESPACE);
        let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
        library.add_to(&mut catalog);
        let builtin = catalog
            .default_workflow("team-a", OperatingSystem::Linux)
            .expect("the library has a Linux default")
            .name_any();
        let mut impostor = library
            .workflows
            .iter()
            .find(|w| w.name_any() == builtin)
            .unwrap()
            .clone();
        impostor.metadata.name = Some("aaa-linux".into());
        impostor.metadata.labels = None;
        catalog.add_workflow(impostor);
        let chosen = catalog
            .default_workflow("team-a", OperatingSystem::Linux)
            .unwrap();
        assert!(
            chosen.labels().get(BUILTIN_LABEL).map(String::as_str) == Some("true"),
            "team-a's plans now default to {}/{}, an object the admission policy never protected (the built-in default is {builtin})",
            chosen.namespace().unwrap_or_default(),
            chosen.name_any()
        );
    }
}
