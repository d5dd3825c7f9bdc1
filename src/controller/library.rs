//! Keeps the built-in library in the controller's namespace: applied at start and
//! every minute with forced server-side apply, so edits are put back.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::api::common::NamespacedKind;
use crate::api::library::Library;

use crate::field_manager;

async fn apply_all<K>(client: &Client, namespace: &str, objects: &[K]) -> Result<(), kube::Error>
where
    K: NamespacedKind,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    for object in objects {
        let mut body = serde_json::to_value(object).expect("library objects serialize");
        body["apiVersion"] = K::api_version(&()).into();
        body["kind"] = K::kind(&()).into();
        if let Some(meta) = body["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        body.as_object_mut().expect("object").remove("status");
        api.patch(
            &object.name_any(),
            &PatchParams::apply(field_manager::CONTROLLER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    }
    Ok(())
}

/// Applies every built-in object once.
pub async fn install(client: &Client, namespace: &str) -> Result<(), kube::Error> {
    let library = Library::load(namespace);
    apply_all(client, namespace, &library.scripts).await?;
    apply_all(client, namespace, &library.tasks).await?;
    apply_all(client, namespace, &library.workflows).await?;
    Ok(())
}

/// Re-applies the library forever, restoring anything edited or deleted.
pub async fn keep_installed(client: Client, namespace: String, every: Duration) {
    loop {
        if let Err(err) = install(&client, &namespace).await {
            tracing::warn!(error = %err, "cannot install the built-in library");
        }
        tokio::time::sleep(every).await;
    }
}
