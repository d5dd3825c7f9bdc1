//! DELETE and what follows it: delete options (propagation, grace period), the
//! answer (the object while it is held, a `Status` once gone for most kinds),
//! finalizers, pods' grace periods, ownerReference garbage collection in the
//! background, in the foreground (`foregroundDeletion`) or orphaning (`orphan`), and
//! namespaces that stay Terminating until their contents are gone.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::errors::ApiError;
use super::handlers::{self, Request, Target, json_response, map_store_error};
use super::registry::ResourceKind;
use super::store::{self, StoreError};
use super::{CRD_KEY, NAMESPACE_KEY, Server, disruption, managed};

const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
const ORPHAN_FINALIZER: &str = "orphan";
/// The namespace controller's finalizer (in a Namespace's `spec.finalizers`).
pub(super) const NAMESPACE_FINALIZER: &str = "kubernetes";
/// The kinds whose DELETE answers with the deleted object; every other kind answers
/// with a `Status` naming it (the API server's `ReturnDeletedObject`).
const RETURN_DELETED_OBJECT: &[&str] = &[
    "/pods",
    "/namespaces",
    "/serviceaccounts",
    "/services",
    "/persistentvolumeclaims",
    "/persistentvolumes",
    "/resourcequotas",
    "/podtemplates",
];

/// What happens to an object's dependents when it is deleted (`propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes now; dependents are garbage-collected after it.
    Background,
    /// The object stays (finalizer `foregroundDeletion`) until its dependents are gone.
    Foreground,
    /// Dependents stay and lose their reference to the object (finalizer `orphan`
    /// until they have).
    Orphan,
}

impl Propagation {
    pub fn parse(text: Option<&str>) -> Option<Self> {
        match text {
            Some("Foreground") => Some(Self::Foreground),
            Some("Orphan") => Some(Self::Orphan),
            Some("Background") => Some(Self::Background),
            _ => None,
        }
    }
}

/// What a DELETE asks for: `DeleteOptions` from the body, or the same as query
/// parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    pub propagation: Option<Propagation>,
    pub grace_period_seconds: Option<i64>,
}

impl DeleteOptions {
    pub fn parse(body: &Value, query: &std::collections::HashMap<String, String>) -> Self {
        let orphan = body["orphanDependents"]
            .as_bool()
            .or_else(|| query.get("orphanDependents").map(|o| o == "true"))
            .map(|o| {
                if o {
                    Propagation::Orphan
                } else {
                    Propagation::Background
                }
            });
        Self {
            propagation: Propagation::parse(
                body["propagationPolicy"]
                    .as_str()
                    .or(query.get("propagationPolicy").map(String::as_str)),
            )
            .or(orphan),
            grace_period_seconds: body["gracePeriodSeconds"]
                .as_i64()
                .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok())),
        }
    }

    pub fn with_propagation(self, propagation: Propagation) -> Self {
        Self {
            propagation: Some(self.propagation.unwrap_or(propagation)),
            ..self
        }
    }
}

/// How a DELETE ended.
pub enum Deleted {
    /// The object is gone; its last state.
    Removed(Arc<Value>),
    /// The object stays, marked for deletion, until finalizers or a grace period end.
    Pending(Arc<Value>),
}

impl Deleted {
    /// What a DELETE answers: the marked object while it is pending; once gone, the
    /// object for the kinds that return it and a `Status` naming it for the others.
    pub fn answer(&self, kind: &ResourceKind) -> Value {
        match self {
            Self::Pending(object) => (**object).clone(),
            Self::Removed(object)
                if RETURN_DELETED_OBJECT.contains(&kind.storage_key().as_str()) =>
            {
                (**object).clone()
            }
            Self::Removed(object) => {
                let mut details = json!({
                    "name": object["metadata"]["name"], "kind": kind.plural,
                    "uid": object["metadata"]["uid"],
                });
                if !kind.group.is_empty() {
                    details["group"] = json!(kind.group);
                }
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
            }
        }
    }
}

/// How long a pod being deleted stays: its grace period, or none when it never ran on
/// a node or has finished.
fn pod_grace_period(pod: &Value, options: &DeleteOptions) -> i64 {
    let finished = matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) || finished {
        return 0;
    }
    options
        .grace_period_seconds
        .or(pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30)
        .max(0)
}

impl Request<'_> {
    pub(super) fn delete(&self, target: &Target, options: Value) -> Result<Response, ApiError> {
        let old = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        let pre = &options["preconditions"];
        let kind = &target.kind;
        let precondition_failed =
            |why: String| ApiError::conflict_because(&kind.group, &kind.kind, target.name(), why);
        if let Some(uid) = pre["uid"].as_str() {
            let actual = old["metadata"]["uid"].as_str().unwrap_or_default();
            if uid != actual {
                return Err(precondition_failed(format!(
                    "the UID in the precondition ({uid}) does not match the UID in record ({actual}). The object might have been deleted and then recreated"
                )));
            }
        }
        if let Some(rv) = pre["resourceVersion"].as_str() {
            let actual = old["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if rv != actual {
                return Err(precondition_failed(format!(
                    "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({actual}). The object might have been modified"
                )));
            }
        }
        let options = DeleteOptions::parse(&options, self.query);
        if self.dry_run() {
            let answer = Deleted::Removed(old.clone()).answer(kind);
            return Ok(self.respond(target, StatusCode::OK, &answer, &[]));
        }
        let deleted = self
            .server
            .delete_object(kind, &old, options)
            .map_err(|e| map_store_error(target, e))?;
        let answer = deleted.answer(kind);
        if answer["kind"] == "Status" {
            return Ok(json_response(StatusCode::OK, &answer, &[]));
        }
        Ok(self.respond(target, StatusCode::OK, &answer, &[]))
    }

    pub(super) fn delete_collection(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let (items, _) = self
            .server
            .store
            .list(&target.key(), target.namespace.as_deref());
        for item in items
            .iter()
            .filter(|i| labels.matches(i) && fields.matches(i))
        {
            match self.server.delete_object(
                &target.kind,
                item,
                DeleteOptions::parse(&Value::Null, self.query),
            ) {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(err) => return Err(map_store_error(target, err)),
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            &[],
        ))
    }
}

impl Server {
    /// Deletes an object as a DELETE request does: marks it (`deletionTimestamp`) when
    /// finalizers, a foreground or orphaning deletion or a pod's grace period hold it,
    /// removes it otherwise. The garbage collector's part follows asynchronously, as
    /// on a real cluster.
    pub fn delete_object(
        self: &Arc<Self>,
        kind: &ResourceKind,
        object: &Value,
        options: DeleteOptions,
    ) -> Result<Deleted, StoreError> {
        let key = kind.storage_key();
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok(Deleted::Pending(Arc::new(object.clone())));
        }
        let mut finalizers: Vec<Value> = object["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        match options.propagation {
            Some(Propagation::Foreground) => {
                finalizers.retain(|f| f != ORPHAN_FINALIZER);
                if !finalizers.contains(&json!(FOREGROUND_FINALIZER)) {
                    finalizers.push(json!(FOREGROUND_FINALIZER));
                }
            }
            Some(Propagation::Orphan) => {
                finalizers.retain(|f| f != FOREGROUND_FINALIZER);
                if !finalizers.contains(&json!(ORPHAN_FINALIZER)) {
                    finalizers.push(json!(ORPHAN_FINALIZER));
                }
            }
            Some(Propagation::Background) | None => {}
        }
        let is_pod = key == "/pods";
        let grace = if is_pod {
            pod_grace_period(object, &options)
        } else {
            0
        };
        if key == NAMESPACE_KEY {
            return self.delete_namespace(object, finalizers);
        }
        if finalizers.is_empty() && grace == 0 && !is_pod {
            return self.remove_object(&key, ns, name).map(Deleted::Removed);
        }
        let mut marked = object.clone();
        let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
        marked["metadata"]["deletionTimestamp"] = json!(disruption::format_time(at));
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        if finalizers.is_empty() {
            if let Some(meta) = marked["metadata"].as_object_mut() {
                meta.remove("finalizers");
            }
        } else {
            marked["metadata"]["finalizers"] = json!(finalizers);
        }
        if is_pod && let Some(generation) = marked["metadata"]["generation"].as_i64() {
            marked["metadata"]["generation"] = json!(generation + 1);
        }
        let stored = self.store.replace(&key, marked, None)?;
        if finalizers.is_empty() && grace == 0 {
            // A pod that never ran, or may stop at once: gone after being marked.
            return self.remove_object(&key, ns, name).map(Deleted::Removed);
        }
        self.after_write(kind, &stored);
        let uid = stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match options.propagation {
            Some(Propagation::Foreground) => {
                let server = self.clone();
                tokio::spawn(async move { server.delete_dependents_first(&uid) });
            }
            Some(Propagation::Orphan) => {
                let server = self.clone();
                tokio::spawn(async move { server.orphan_dependents(&uid) });
            }
            _ => {}
        }
        Ok(Deleted::Pending(stored))
    }

    fn kind_for_key(&self, key: &str) -> Option<Arc<ResourceKind>> {
        self.registry
            .all()
            .iter()
            .find(|k| k.storage_key() == key)
            .cloned()
    }

    /// The dependents that hold an owner in foreground deletion.
    fn blocking_dependents(&self, uid: &str) -> Vec<(String, Arc<Value>)> {
        self.store
            .dependents_of(uid)
            .into_iter()
            .filter(|(_, d)| {
                d["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["uid"] == uid && r["blockOwnerDeletion"] == true)
            })
            .collect()
    }

    /// Foreground deletion, the garbage collector's part: delete the dependents (in
    /// the foreground themselves when they have dependents of their own), and let the
    /// owner go once none of them blocks it any more.
    fn delete_dependents_first(self: &Arc<Self>, uid: &str) {
        for (dependent_key, dependent) in self.store.dependents_of(uid) {
            let Some(kind) = self.kind_for_key(&dependent_key) else {
                continue;
            };
            let own_uid = dependent["metadata"]["uid"].as_str().unwrap_or_default();
            let propagation = if self.store.dependents_of(own_uid).is_empty() {
                Propagation::Background
            } else {
                Propagation::Foreground
            };
            let options = DeleteOptions::default().with_propagation(propagation);
            if let Err(err) = self.delete_object(&kind, &dependent, options) {
                tracing::debug!(%err, "dependent already gone");
            }
        }
        self.release_owner(uid, FOREGROUND_FINALIZER);
    }

    /// Orphaning, the garbage collector's part: the dependents lose their reference to
    /// the owner, then the owner loses its `orphan` finalizer.
    fn orphan_dependents(self: &Arc<Self>, uid: &str) {
        for (key, dependent) in self.store.dependents_of(uid) {
            self.drop_owner_reference(&key, &dependent, uid);
        }
        self.release_owner(uid, ORPHAN_FINALIZER);
    }

    /// Removes `uid` from a dependent's ownerReferences, as the garbage collector's
    /// update (so managedFields forget the reference too).
    fn drop_owner_reference(self: &Arc<Self>, key: &str, dependent: &Value, uid: &str) {
        let mut updated = dependent.clone();
        let remaining: Vec<Value> = dependent["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["uid"].as_str() != Some(uid))
            .cloned()
            .collect();
        if remaining.is_empty() {
            if let Some(meta) = updated["metadata"].as_object_mut() {
                meta.remove("ownerReferences");
            }
        } else {
            updated["metadata"]["ownerReferences"] = json!(remaining);
        }
        let now = handlers::now();
        let kind = self.kind_for_key(key);
        let api_version = kind.as_ref().map(|k| k.api_version()).unwrap_or_default();
        managed::record_update(
            Some(dependent),
            &mut updated,
            None,
            kind.as_ref().is_some_and(|k| !k.custom),
            &managed::Writer {
                manager: "kube-controller-manager",
                subresource: "",
                api_version: &api_version,
                now: &now,
            },
        );
        if let Err(err) = self
            .store
            .replace(key, updated, Some(store::resource_version(dependent)))
        {
            tracing::debug!(%err, "dependent changed while orphaning");
        }
    }

    /// Takes a garbage-collection finalizer off an owner once nothing holds it (for
    /// foreground deletion: no blocking dependent is left); removes the owner when it
    /// was the last finalizer.
    fn release_owner(self: &Arc<Self>, uid: &str, finalizer: &str) {
        let Some((key, ns, name)) = self.store.locate_uid(uid) else {
            return;
        };
        let Some(current) = self.store.get(&key, &ns, &name) else {
            return;
        };
        let finalizers: Vec<Value> = current["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !finalizers.contains(&json!(finalizer))
            || (finalizer == FOREGROUND_FINALIZER && !self.blocking_dependents(uid).is_empty())
        {
            return;
        }
        let remaining: Vec<Value> = finalizers.into_iter().filter(|f| f != finalizer).collect();
        let mut updated = (*current).clone();
        if remaining.is_empty() {
            if let Some(meta) = updated["metadata"].as_object_mut() {
                meta.remove("finalizers");
            }
        } else {
            updated["metadata"]["finalizers"] = json!(remaining);
        }
        let result = self
            .store
            .replace(&key, updated, Some(store::resource_version(&current)));
        if result.is_ok() && remaining.is_empty() {
            let _ = self.remove_object(&key, &ns, &name);
        }
    }

    /// After a dependent is gone: owners in foreground deletion it held may go now.
    fn release_foreground_owners(self: &Arc<Self>, removed: &Value) {
        for owner in removed["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(uid) = owner["uid"].as_str() {
                self.release_owner(uid, FOREGROUND_FINALIZER);
            }
        }
    }

    /// Removes an object whose last finalizer is gone.
    pub fn remove_now(self: &Arc<Self>, kind: &ResourceKind, ns: &str, name: &str) {
        if let Err(err) = self.remove_object(&kind.storage_key(), ns, name) {
            tracing::debug!(%err, ns, name, "object already gone");
        }
    }

    fn remove_object(
        self: &Arc<Self>,
        key: &str,
        ns: &str,
        name: &str,
    ) -> Result<Arc<Value>, StoreError> {
        let removed = self.store.remove(key, ns, name, None)?;
        if key == CRD_KEY {
            let group = removed["spec"]["group"].as_str().unwrap_or_default();
            let plural = removed["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default();
            let objects_key = format!("{group}/{plural}");
            let (objects, _) = self.store.list(&objects_key, None);
            for object in objects {
                let meta = &object["metadata"];
                let _ = self.store.remove(
                    &objects_key,
                    meta["namespace"].as_str().unwrap_or_default(),
                    meta["name"].as_str().unwrap_or_default(),
                    None,
                );
            }
            self.refresh_crds();
        }
        if disruption::affects_budgets(key) && !ns.is_empty() {
            self.sync_budgets(ns);
        }
        self.release_foreground_owners(&removed);
        if !ns.is_empty() {
            self.finish_namespace(ns);
        }
        if let Some(uid) = removed["metadata"]["uid"].as_str() {
            let server = self.clone();
            let uid = uid.to_string();
            tokio::spawn(async move { server.collect_dependents(&uid) });
        }
        Ok(removed)
    }

    /// Background garbage collection: dependents whose owners are all gone are
    /// deleted; those with an owner left only lose the reference.
    fn collect_dependents(self: &Arc<Self>, uid: &str) {
        for (key, dependent) in self.store.dependents_of(uid) {
            let alive = dependent["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["uid"].as_str() != Some(uid))
                .any(|r| {
                    r["uid"]
                        .as_str()
                        .is_some_and(|u| self.store.locate_uid(u).is_some())
                });
            if alive {
                self.drop_owner_reference(&key, &dependent, uid);
                continue;
            }
            let Some(kind) = self.kind_for_key(&key) else {
                continue;
            };
            tracing::info!(
                kind = %kind.kind,
                name = dependent["metadata"]["name"].as_str().unwrap_or_default(),
                owner = uid,
                "garbage-collecting a dependent"
            );
            let options = DeleteOptions::default().with_propagation(Propagation::Background);
            if let Err(err) = self.delete_object(&kind, &dependent, options) {
                tracing::debug!(%err, "dependent already gone");
            }
        }
    }

    /// A namespace being deleted: marked Terminating, its contents deleted, and itself
    /// removed once they are gone (objects held by finalizers keep it).
    fn delete_namespace(
        self: &Arc<Self>,
        namespace: &Value,
        finalizers: Vec<Value>,
    ) -> Result<Deleted, StoreError> {
        let name = namespace["metadata"]["name"].as_str().unwrap_or_default();
        let mut marked = namespace.clone();
        marked["metadata"]["deletionTimestamp"] = json!(handlers::now());
        if !finalizers.is_empty() {
            marked["metadata"]["finalizers"] = json!(finalizers);
        }
        marked["status"]["phase"] = json!("Terminating");
        let stored = self.store.replace(NAMESPACE_KEY, marked, None)?;
        let kinds = self.registry.all();
        let mut seen = Vec::new();
        for kind in kinds.iter().filter(|k| k.namespaced && !k.is_virtual()) {
            let key = kind.storage_key();
            if seen.contains(&key) {
                continue;
            }
            seen.push(key.clone());
            let (objects, _) = self.store.list(&key, Some(name));
            for object in objects {
                let options = DeleteOptions::default().with_propagation(Propagation::Background);
                if let Err(err) = self.delete_object(kind, &object, options) {
                    tracing::debug!(%err, "namespace content already gone");
                }
            }
        }
        self.finish_namespace(name);
        Ok(Deleted::Pending(stored))
    }

    /// The namespace controller's last step: a Terminating namespace with nothing left
    /// in it loses its `kubernetes` finalizer and goes (unless other finalizers hold it).
    fn finish_namespace(self: &Arc<Self>, name: &str) {
        let Some(namespace) = self.store.get(NAMESPACE_KEY, "", name) else {
            return;
        };
        if namespace["metadata"]["deletionTimestamp"].is_null() {
            return;
        }
        let kinds = self.registry.all();
        let occupied = kinds
            .iter()
            .filter(|k| k.namespaced && !k.is_virtual())
            .any(|k| !self.store.list(&k.storage_key(), Some(name)).0.is_empty());
        if occupied {
            return;
        }
        let mut updated = (*namespace).clone();
        let spec_finalizers: Vec<Value> = namespace["spec"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| *f != NAMESPACE_FINALIZER)
            .cloned()
            .collect();
        updated["spec"]["finalizers"] = json!(spec_finalizers);
        if spec_finalizers.is_empty()
            && namespace["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
        {
            if let Err(err) = self.remove_object(NAMESPACE_KEY, "", name) {
                tracing::debug!(%err, name, "namespace already gone");
            }
        } else if let Err(err) = self.store.replace(NAMESPACE_KEY, updated, None) {
            tracing::debug!(%err, name, "namespace changed while finishing");
        }
    }
}
