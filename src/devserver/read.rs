//! The read verbs: get, list (label and field selectors, `limit`/`continue`, Tables)
//! and watch (from a resourceVersion, with bookmarks and initial events, objects
//! entering and leaving a selector).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::Server;
use super::errors::ApiError;
use super::events;
use super::handlers::{Request, Target, is_true, json_response, present, wants_table};
use super::registry::ResourceKind;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{self, EventType};
use super::table;

/// An object's place in a list: namespace, then name.
fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// The place a `continue` token stands for.
fn decode_continue(token: &str) -> Option<(String, String)> {
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.split_once('\0')
        .map(|(a, b)| (a.to_string(), b.to_string()))
}

/// One page of a list: the matching items after `start_after`, at most `limit`, and
/// how many matching ones remain after them.
fn page<'a>(
    items: &'a [std::sync::Arc<Value>],
    start_after: Option<&(String, String)>,
    limit: usize,
    matches: impl Fn(&Value) -> bool,
) -> (Vec<&'a Value>, usize) {
    let mut selected: Vec<&Value> = Vec::new();
    let mut remaining = 0usize;
    for item in items {
        if start_after.is_some_and(|after| key_of(item) <= *after) || !matches(item) {
            continue;
        }
        if selected.len() >= limit {
            remaining += 1;
        } else {
            selected.push(item);
        }
    }
    (selected, remaining)
}

/// The event a watch with selectors reports for a change: an object that starts
/// matching is ADDED, one that stops matching is DELETED, one that never matches is
/// not reported — as the API server does it.
pub(super) fn selected_event(
    change: &store::Change,
    matches: &impl Fn(&Value) -> bool,
) -> Option<EventType> {
    let now_matches = matches(&change.object);
    let matched_before = change.previous.as_deref().map(matches);
    match (change.kind, matched_before, now_matches) {
        (EventType::Modified, Some(false), true) => Some(EventType::Added),
        (EventType::Modified, Some(true), false) => Some(EventType::Deleted),
        (_, _, false) => None,
        (kind, _, true) => Some(kind),
    }
}

impl Request<'_> {
    pub(super) fn get(&self, target: &Target) -> Result<Response, ApiError> {
        let key = target.key();
        let object = self
            .server
            .store
            .get(&key, target.ns(), target.name())
            .or_else(|| {
                let other = events::other_api(&key)?;
                let theirs = self.server.store.get(other, target.ns(), target.name())?;
                Some(Arc::new(events::convert(other, &theirs)))
            })
            .ok_or_else(|| target.not_found())?;
        Ok(self.respond(target, StatusCode::OK, &object, &[]))
    }

    pub(super) fn selectors(
        &self,
        target: &Target,
    ) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(
            self.query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let fields = FieldSelector::parse(
            self.query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Custom resources can be selected by name and namespace only (our CRDs declare
        // no selectableFields).
        if target.kind.custom
            && let Some(path) = fields
                .paths()
                .find(|p| !matches!(*p, "metadata.name" | "metadata.namespace"))
        {
            return Err(ApiError::BadRequest(format!(
                "field label not supported: {path}"
            )));
        }
        Ok((labels, fields))
    }

    pub(super) fn list(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let key = target.key();
        let (mut items, rv) = self.server.store.list(&key, target.namespace.as_deref());
        if let Some(other) = events::other_api(&key) {
            let (theirs, _) = self.server.store.list(other, target.namespace.as_deref());
            items.extend(
                theirs
                    .iter()
                    .map(|event| Arc::new(events::convert(other, event))),
            );
            items.sort_by_key(|item| key_of(item));
        }
        let start_after = self
            .query
            .get("continue")
            .filter(|c| !c.is_empty())
            .map(|token| {
                decode_continue(token)
                    .ok_or_else(|| ApiError::BadRequest("invalid continue token".into()))
            })
            .transpose()?;
        let limit: usize = self
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let matches = |item: &Value| labels.matches(item) && fields.matches(item);
        let (selected, remaining) = page(&items, start_after.as_ref(), limit, matches);
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if remaining > 0
            && let Some(last) = selected.last()
        {
            let (ns, name) = key_of(last);
            meta["continue"] = json!(base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                format!("{ns}\0{name}")
            ));
            meta["remainingItemCount"] = json!(remaining);
        }
        if wants_table(self.headers) {
            let table = table::render(
                &target.kind,
                &selected,
                meta,
                self.query
                    .get("includeObject")
                    .map(String::as_str)
                    .unwrap_or("Metadata"),
                true,
            );
            return Ok(json_response(StatusCode::OK, &table, &[]));
        }
        if target.kind.custom && meta["continue"].is_null() {
            // Unstructured lists always carry the field.
            meta["continue"] = json!("");
        }
        #[derive(Serialize)]
        struct List<'a> {
            kind: String,
            #[serde(rename = "apiVersion")]
            api_version: String,
            metadata: Value,
            items: Vec<&'a Value>,
        }
        let api_version = target.kind.api_version();
        let converted: Vec<Value>;
        let items: Vec<&Value> = if target.kind.custom
            && selected
                .iter()
                .any(|o| o["apiVersion"].as_str() != Some(api_version.as_str()))
        {
            converted = selected.iter().map(|o| present(&target.kind, o)).collect();
            converted.iter().collect()
        } else {
            selected
        };
        Ok(json_response(
            StatusCode::OK,
            &List {
                kind: target.kind.list_kind(),
                api_version,
                metadata: meta,
                items,
            },
            &[],
        ))
    }

    pub(super) fn watch(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let since = match self.query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(
                rv.parse::<u64>()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
            ),
        };
        let send_initial = is_true(self.query, "sendInitialEvents");
        let since = if send_initial { None } else { since };
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let watch = Watch {
            server: self.server.clone(),
            kind: target.kind.clone(),
            key: target.key(),
            namespace: target.namespace.clone(),
            labels,
            fields,
            since,
            send_initial,
            bookmarks: is_true(self.query, "allowWatchBookmarks"),
            timeout: self
                .query
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(1800)),
            as_table: wants_table(self.headers),
            include_object: self
                .query
                .get("includeObject")
                .cloned()
                .unwrap_or_else(|| "Metadata".into()),
            tx,
            first: true,
        };
        let subscription =
            self.server
                .store
                .subscribe(&watch.key, watch.namespace.as_deref(), since);
        tokio::spawn(watch.run(subscription));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
        });
        let mut response = Response::new(Body::from_stream(stream));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        Ok(response)
    }
}

/// One open watch: what it asked for, and the channel its events go out on.
struct Watch {
    server: Arc<Server>,
    kind: Arc<ResourceKind>,
    key: String,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    since: Option<u64>,
    send_initial: bool,
    bookmarks: bool,
    timeout: Duration,
    as_table: bool,
    include_object: String,
    tx: mpsc::Sender<Bytes>,
    /// Whether the next Table row is the first (which carries the columns).
    first: bool,
}

impl Watch {
    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"apiVersion": self.kind.api_version(), "kind": self.kind.kind, "metadata": meta})
    }

    /// Sends one event; false once the client is gone.
    async fn send(&mut self, event: &str, object: &Value) -> bool {
        let object = if self.as_table && event != "BOOKMARK" && event != "ERROR" {
            let table = table::render(
                &self.kind,
                &[object],
                json!({}),
                &self.include_object,
                self.first,
            );
            self.first = false;
            table
        } else {
            present(&self.kind, object)
        };
        let mut line =
            serde_json::to_vec(&json!({"type": event, "object": object})).unwrap_or_default();
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    /// Sends a change if this watch sees it (its kind, namespace and selectors).
    async fn send_change(&mut self, change: &store::Change) -> bool {
        if change.key != self.key
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != change.namespace)
        {
            return true;
        }
        match selected_event(change, &|o| self.matches(o)) {
            Some(event) => self.send(event.as_str(), &change.object).await,
            None => true,
        }
    }

    async fn run(mut self, subscription: Result<store::Subscription, store::StoreError>) {
        let mut subscription = match subscription {
            Ok(s) => s,
            Err(err) => {
                let status = ApiError::Gone(err.to_string()).to_status();
                self.send("ERROR", &status).await;
                return;
            }
        };
        let mut last = self.since.unwrap_or(subscription.rv);
        for change in std::mem::take(&mut subscription.backlog) {
            last = last.max(change.rv);
            if !self.send_change(&change).await {
                return;
            }
        }
        last = last.max(subscription.rv);
        if self.send_initial {
            let end = self.bookmark(last, true);
            self.send("BOOKMARK", &end).await;
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(self.server.bookmark_interval);
        ticker.tick().await;
        loop {
            let changes = tokio::select! {
                _ = &mut deadline => return,
                _ = ticker.tick() => {
                    let bookmark = self.bookmark(last, false);
                    if self.bookmarks && !self.send("BOOKMARK", &bookmark).await {
                        return;
                    }
                    continue;
                }
                _ = self.tx.closed() => return,
                received = subscription.live.recv() => match received {
                    Ok(change) => vec![change],
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        match self.server.store.replay(&self.key, self.namespace.as_deref(), last) {
                            Ok(changes) => changes,
                            Err(err) => {
                                let status = ApiError::Gone(err.to_string()).to_status();
                                self.send("ERROR", &status).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            for change in changes {
                if change.rv <= last {
                    continue;
                }
                last = change.rv;
                if !self.send_change(&change).await {
                    return;
                }
            }
        }
    }
}
