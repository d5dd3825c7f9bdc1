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
