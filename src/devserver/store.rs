//! The object store: every object of every resource, keyed by storage key
//! (`group/plural`), namespace and name; one global, strictly rising
//! resourceVersion; a bounded log of recent changes that watches replay from; and a
//! broadcast channel that fans each change out to every open watch.
//!
//! Writes take one short lock, so the journal (with `--data-dir`), the change log and
//! the broadcast all see changes in resourceVersion order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

use super::persist::{Journal, JournalError, Loaded};

/// How many recent changes a watch can resume from before it gets 410 Gone. Each
/// entry keeps an object version alive, so this bounds the memory old versions take
/// (a real API server's watch cache is similarly bounded).
const LOG_CAPACITY: usize = 20_000;
/// Buffered changes per watch before it falls back to replaying the log.
const BROADCAST_CAPACITY: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change to one object.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub key: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Arc<Value>,
    /// The object before a modification, so filtered watches can tell when an object
    /// starts or stops matching their selectors.
    pub previous: Option<Arc<Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("resourceVersion conflict")]
    Conflict,
    #[error("too old resource version: {requested} (oldest available {oldest})")]
    Gone { requested: u64, oldest: u64 },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

type Objects = BTreeMap<(String, String), Arc<Value>>;

struct Inner {
    rv: u64,
    objects: HashMap<String, Objects>,
    /// uid → where the object lives, for garbage collection of dependents.
    uids: HashMap<String, (String, String, String)>,
    log: VecDeque<Arc<Change>>,
    /// Every change with rv > `log_floor` is in `log`.
    log_floor: u64,
    journal: Option<Journal>,
}

pub struct Store {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Arc<Change>>,
}

/// A watch's starting point: changes to replay, then live ones.
pub struct Subscription {
    pub backlog: Vec<Arc<Change>>,
    pub live: broadcast::Receiver<Arc<Change>>,
    /// The store's resourceVersion when the subscription was taken.
    pub rv: u64,
}

pub fn resource_version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

impl Inner {
    /// The stored object a write replaces or removes: it must exist and, with
    /// `expected_rv`, still be at that version.
    fn current(
        &self,
        key: &str,
        id: &(String, String),
        expected_rv: Option<u64>,
    ) -> Result<&Arc<Value>, StoreError> {
        let current = self
            .objects
            .get(key)
            .and_then(|o| o.get(id))
            .ok_or(StoreError::NotFound)?;
        match expected_rv {
            Some(expected) if resource_version(current) != expected => Err(StoreError::Conflict),
            _ => Ok(current),
        }
    }
}

fn object_key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl Store {
    /// An empty store, or one filled from the journal in `data_dir`.
    pub fn open(data_dir: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let (journal, loaded) = match data_dir {
            Some(dir) => {
                let (journal, loaded) = Journal::open(dir)?;
                (Some(journal), loaded)
            }
            None => (None, Loaded::default()),
        };
        let mut uids = HashMap::new();
        let objects = loaded
            .objects
            .into_iter()
            .map(|(key, objects)| {
                let objects: Objects = objects
                    .into_iter()
                    .map(|(k, v)| {
                        if let Some(uid) = v["metadata"]["uid"].as_str() {
                            uids.insert(uid.to_string(), (key.clone(), k.0.clone(), k.1.clone()));
                        }
                        (k, Arc::new(v))
                    })
                    .collect();
                (key, objects)
            })
            .collect();
        let (changes, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Mutex::new(Inner {
                rv: loaded.resource_version,
                objects,
                uids,
                log: VecDeque::new(),
                log_floor: loaded.resource_version,
                journal,
            }),
            changes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, key: &str, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.lock()
            .objects
            .get(key)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Objects of one resource (in one namespace when given), sorted by namespace and
    /// name, with the store's resourceVersion at the time.
    pub fn list(&self, key: &str, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let Some(objects) = inner.objects.get(key) else {
            return (Vec::new(), inner.rv);
        };
        let items = match namespace {
            Some(ns) => objects
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v.clone())
                .collect(),
            None => objects.values().cloned().collect(),
        };
        (items, inner.rv)
    }

    /// Where the object with this uid lives: (storage key, namespace, name).
    pub fn locate_uid(&self, uid: &str) -> Option<(String, String, String)> {
        self.lock().uids.get(uid).cloned()
    }

    /// Every object (of any resource) whose ownerReferences name `uid`.
    pub fn dependents_of(&self, uid: &str) -> Vec<(String, Arc<Value>)> {
        let inner = self.lock();
        let mut found = Vec::new();
        for (key, objects) in &inner.objects {
            for object in objects.values() {
                if let Some(refs) = object["metadata"]["ownerReferences"].as_array()
                    && refs.iter().any(|r| r["uid"].as_str() == Some(uid))
                {
                    found.push((key.clone(), object.clone()));
                }
            }
        }
        found
    }

    pub fn create(&self, key: &str, object: Value) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let id = object_key(&object);
        if inner.objects.get(key).is_some_and(|o| o.contains_key(&id)) {
            return Err(StoreError::AlreadyExists);
        }
        self.commit(&mut inner, key, id, EventType::Added, object, None)
    }

    /// Replaces an existing object; with `expected_rv`, only if it is still at that version.
    pub fn replace(
        &self,
        key: &str,
        object: Value,
        expected_rv: Option<u64>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let id = object_key(&object);
        let current = inner.current(key, &id, expected_rv)?;
        let previous = current.clone();
        self.commit(
            &mut inner,
            key,
            id,
            EventType::Modified,
            object,
            Some(previous),
        )
    }

    /// Removes an object; the DELETED event carries it with a new resourceVersion.
    pub fn remove(
        &self,
        key: &str,
        namespace: &str,
        name: &str,
        expected_rv: Option<u64>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let id = (namespace.to_string(), name.to_string());
        let current = inner.current(key, &id, expected_rv)?;
        let object = (**current).clone();
        self.commit(&mut inner, key, id, EventType::Deleted, object, None)
    }

    fn commit(
        &self,
        inner: &mut Inner,
        key: &str,
        id: (String, String),
        kind: EventType,
        mut object: Value,
        previous: Option<Arc<Value>>,
    ) -> Result<Arc<Value>, StoreError> {
        let rv = inner.rv + 1;
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let object = Arc::new(object);
        if let Some(journal) = inner.journal.as_mut() {
            let stored = (kind != EventType::Deleted).then_some(&*object);
            journal.append(rv, key, &id.0, &id.1, stored)?;
        }
        if inner
            .journal
            .as_ref()
            .is_some_and(Journal::wants_compaction)
        {
            let Inner {
                journal, objects, ..
            } = &mut *inner;
            if let Some(journal) = journal.as_mut() {
                // The write above is already in the file; the snapshot must include it.
                let mut snapshot: Vec<(&str, &str, &str, &Value)> = Vec::new();
                for (res, items) in objects.iter() {
                    for ((ns, name), obj) in items {
                        snapshot.push((res, ns, name, obj));
                    }
                }
                let pending = (key, id.0.as_str(), id.1.as_str(), &*object);
                let deleted = kind == EventType::Deleted;
                let merged = snapshot
                    .into_iter()
                    .filter(|(res, ns, name, _)| !(*res == key && *ns == id.0 && *name == id.1))
                    .chain((!deleted).then_some(pending));
                journal.compact(rv, merged)?;
            }
        }
        inner.rv = rv;
        let uid = object["metadata"]["uid"].as_str().map(str::to_string);
        let objects = inner.objects.entry(key.to_string()).or_default();
        if kind == EventType::Deleted {
            objects.remove(&id);
            if let Some(uid) = uid {
                inner.uids.remove(&uid);
            }
        } else {
            objects.insert(id.clone(), object.clone());
            if let Some(uid) = uid {
                inner
                    .uids
                    .insert(uid, (key.to_string(), id.0.clone(), id.1.clone()));
            }
        }
        let change = Arc::new(Change {
            rv,
            key: key.to_string(),
            namespace: id.0,
            kind,
            object: object.clone(),
            previous,
        });
        inner.log.push_back(change.clone());
        while inner.log.len() > LOG_CAPACITY {
            if let Some(old) = inner.log.pop_front() {
                inner.log_floor = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
        Ok(object)
    }

    /// Starts a watch on one resource. `since` = None means "from now, starting with
    /// the current objects as ADDED events"; Some(rv) replays the changes after rv.
    pub fn subscribe(
        &self,
        key: &str,
        namespace: Option<&str>,
        since: Option<u64>,
    ) -> Result<Subscription, StoreError> {
        let inner = self.lock();
        let live = self.changes.subscribe();
        let backlog = match since {
            None => {
                let objects = inner.objects.get(key);
                objects
                    .into_iter()
                    .flat_map(|o| o.iter())
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|((ns, _), object)| {
                        Arc::new(Change {
                            rv: resource_version(object),
                            key: key.to_string(),
                            namespace: ns.clone(),
                            kind: EventType::Added,
                            object: object.clone(),
                            previous: None,
                        })
                    })
                    .collect()
            }
            Some(since) => Self::changes_since(&inner, key, namespace, since)?,
        };
        Ok(Subscription {
            backlog,
            live,
            rv: inner.rv,
        })
    }

    /// Changes after `since`, for a watch that fell behind the broadcast.
    pub fn replay(
        &self,
        key: &str,
        namespace: Option<&str>,
        since: u64,
    ) -> Result<Vec<Arc<Change>>, StoreError> {
        Self::changes_since(&self.lock(), key, namespace, since)
    }

    fn changes_since(
        inner: &Inner,
        key: &str,
        namespace: Option<&str>,
        since: u64,
    ) -> Result<Vec<Arc<Change>>, StoreError> {
        if since < inner.log_floor {
            return Err(StoreError::Gone {
                requested: since,
                oldest: inner.log_floor,
            });
        }
        let start = inner.log.partition_point(|c| c.rv <= since);
        Ok(inner
            .log
            .range(start..)
            .filter(|c| c.key == key && namespace.is_none_or(|ns| ns == c.namespace))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")}})
    }

    #[test]
    fn versions_rise_and_conflicts_are_caught() {
        let store = Store::open(None).unwrap();
        let a = store.create("/configmaps", obj("a")).unwrap();
        assert_eq!(resource_version(&a), 1);
        assert!(matches!(
            store.create("/configmaps", obj("a")),
            Err(StoreError::AlreadyExists)
        ));
        let b = store.replace("/configmaps", obj("a"), Some(1)).unwrap();
        assert_eq!(resource_version(&b), 2);
        assert!(matches!(
            store.replace("/configmaps", obj("a"), Some(1)),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.locate_uid("uid-a").unwrap().2, "a");
        store.remove("/configmaps", "ns", "a", None).unwrap();
        assert!(store.get("/configmaps", "ns", "a").is_none());
        assert!(store.locate_uid("uid-a").is_none());
        assert_eq!(store.current_rv(), 3);
    }

    #[test]
    fn watches_replay_from_a_version() {
        let store = Store::open(None).unwrap();
        store.create("/configmaps", obj("a")).unwrap();
        store.create("/secrets", obj("s")).unwrap();
        store.create("/configmaps", obj("b")).unwrap();
        let sub = store.subscribe("/configmaps", Some("ns"), Some(1)).unwrap();
        let names: Vec<_> = sub
            .backlog
            .iter()
            .map(|c| c.object["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("b")]);
        let sub = store.subscribe("/configmaps", None, None).unwrap();
        assert_eq!(sub.backlog.len(), 2);
    }

    #[test]
    fn persisted_objects_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(Some(dir.path())).unwrap();
            store.create("/configmaps", obj("a")).unwrap();
            store.create("/configmaps", obj("b")).unwrap();
            store.remove("/configmaps", "ns", "b", None).unwrap();
        }
        let store = Store::open(Some(dir.path())).unwrap();
        assert!(store.get("/configmaps", "ns", "a").is_some());
        assert!(store.get("/configmaps", "ns", "b").is_none());
        assert_eq!(store.current_rv(), 3);
        // A watch from the last version seen before the restart still works...
        assert!(store.subscribe("/configmaps", None, Some(3)).is_ok());
        // ...and one from before it is told to re-list.
        assert!(matches!(
            store.subscribe("/configmaps", None, Some(1)),
            Err(StoreError::Gone { .. })
        ));
        let c = store.create("/configmaps", obj("c")).unwrap();
        assert_eq!(resource_version(&c), 4);
    }
}
