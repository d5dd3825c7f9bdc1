//! Field ownership (`metadata.managedFields`, `FieldsV1`) and server-side apply.
//!
//! Each manager owns a set of field paths. An apply merges the applied configuration
//! into the object, refuses (409) to change a field another manager owns with a
//! different value unless forced, takes the forced fields over, and removes the
//! fields the manager applied last time but no longer does (when nobody else owns
//! them). Ordinary writes (create, update, patch) give the manager ownership of the
//! fields they changed and take it from everyone else.
//!
//! List semantics come from the schema (`x-kubernetes-list-type`: `map` items are
//! owned per key, `set` items per value, anything else is atomic); the few metadata
//! lists follow the API server (finalizers a set, ownerReferences a map by uid).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Elem {
    Field(String),
    /// A list-map item, by its key fields as a canonical JSON object.
    Key(String),
    /// A set item, by its JSON value.
    Item(String),
}

pub type FieldPath = Vec<Elem>;

/// A path as the API server prints it: `.spec.containers[name="app"].image`,
/// `.metadata.finalizers[="a"]`.
pub fn path_to_string(path: &FieldPath) -> String {
    let mut out = String::new();
    for elem in path {
        match elem {
            Elem::Field(f) => {
                out.push('.');
                out.push_str(f);
            }
            Elem::Key(k) => {
                let fields: Vec<String> = match serde_json::from_str::<Value>(k) {
                    Ok(Value::Object(key)) => {
                        key.iter().map(|(name, v)| format!("{name}={v}")).collect()
                    }
                    _ => vec![k.clone()],
                };
                out.push_str(&format!("[{}]", fields.join(",")));
            }
            Elem::Item(v) => out.push_str(&format!("[={v}]")),
        }
    }
    out
}

/// The order the API server lists paths of a field set in (a depth-first walk where,
/// at each level, the fields that end there come before those that go deeper).
fn walk_order(a: &FieldPath, b: &FieldPath) -> std::cmp::Ordering {
    for i in 0..a.len().min(b.len()) {
        let (a_ends, b_ends) = (i + 1 == a.len(), i + 1 == b.len());
        if a_ends != b_ends {
            return if a_ends {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            };
        }
        match a[i].cmp(&b[i]) {
            std::cmp::Ordering::Equal if !a_ends => continue,
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

enum ListType {
    Map(Vec<String>),
    Set,
    Atomic,
}

fn list_type(schema: Option<&Value>, path: &FieldPath) -> ListType {
    let meta_list = |name: &str| {
        path.len() == 2
            && path[0] == Elem::Field("metadata".into())
            && path[1] == Elem::Field(name.into())
    };
    if meta_list("finalizers") {
        return ListType::Set;
    }
    if meta_list("ownerReferences") {
        return ListType::Map(vec!["uid".into()]);
    }
    match schema
        .and_then(|s| s.get("x-kubernetes-list-type"))
        .and_then(Value::as_str)
    {
        Some("map") => ListType::Map(
            schema
                .and_then(|s| s["x-kubernetes-list-map-keys"].as_array())
                .map(|k| {
                    k.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Some("set") => ListType::Set,
        _ => ListType::Atomic,
    }
}

fn child_schema<'a>(schema: Option<&'a Value>, field: &str) -> Option<&'a Value> {
    let schema = schema?;
    schema["properties"]
        .get(field)
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

fn items_schema(schema: Option<&Value>) -> Option<&Value> {
    schema?.get("items")
}

fn is_atomic_map(schema: Option<&Value>) -> bool {
    schema
        .and_then(|s| s.get("x-kubernetes-map-type"))
        .and_then(Value::as_str)
        == Some("atomic")
}

fn item_key(item: &Value, keys: &[String]) -> String {
    let map: Map<String, Value> = keys
        .iter()
        .filter_map(|k| item.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    Value::Object(map).to_string()
}

/// Root metadata fields that ownership is tracked for.
const TRACKED_METADATA: &[&str] = &[
    "generateName",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
];

/// The field paths set in `value` (an object body), per the schema's list semantics.
pub fn fields_of(value: &Value, schema: Option<&Value>) -> BTreeSet<FieldPath> {
    let mut set = BTreeSet::new();
    if let Some(map) = value.as_object() {
        for (key, child) in map {
            if key == "apiVersion" || key == "kind" {
                continue;
            }
            let path = vec![Elem::Field(key.clone())];
            if key == "metadata" {
                if let Some(meta) = child.as_object() {
                    for (mk, mv) in meta {
                        if TRACKED_METADATA.contains(&mk.as_str()) {
                            walk(
                                mv,
                                None,
                                vec![Elem::Field(key.clone()), Elem::Field(mk.clone())],
                                &mut set,
                            );
                        }
                    }
                }
                continue;
            }
            walk(child, child_schema(schema, key), path, &mut set);
        }
    }
    set
}

fn walk(value: &Value, schema: Option<&Value>, path: FieldPath, set: &mut BTreeSet<FieldPath>) {
    // An ownerReference is owned whole (the API server's OwnerReference is atomic).
    if path.len() == 3
        && path[0] == Elem::Field("metadata".into())
        && path[1] == Elem::Field("ownerReferences".into())
    {
        set.insert(path);
        return;
    }
    match value {
        Value::Object(map) if !map.is_empty() && !is_atomic_map(schema) => {
            for (key, child) in map {
                let mut child_path = path.clone();
                child_path.push(Elem::Field(key.clone()));
                walk(child, child_schema(schema, key), child_path, set);
            }
        }
        Value::Array(items) => match list_type(schema, &path) {
            ListType::Map(keys) if !keys.is_empty() => {
                for item in items {
                    let mut item_path = path.clone();
                    item_path.push(Elem::Key(item_key(item, &keys)));
                    set.insert(item_path.clone());
                    if item_path.len() == 3
                        && path[..]
                            == [
                                Elem::Field("metadata".into()),
                                Elem::Field("ownerReferences".into()),
                            ]
                    {
                        continue;
                    }
                    if let Some(fields) = item.as_object() {
                        for (key, child) in fields {
                            let mut child_path = item_path.clone();
                            child_path.push(Elem::Field(key.clone()));
                            walk(
                                child,
                                child_schema(items_schema(schema), key),
                                child_path,
                                set,
                            );
                        }
                    }
                }
            }
            ListType::Set => {
                for item in items {
                    let mut item_path = path.clone();
                    item_path.push(Elem::Item(item.to_string()));
                    set.insert(item_path);
                }
            }
            _ => {
                set.insert(path);
            }
        },
        _ => {
            set.insert(path);
        }
    }
}

/// The maps and lists in `value` that an ordinary write which creates them owns as a
/// whole (`"."` in `FieldsV1`): associative lists, and maps — for a built-in kind
/// (`typed`) only those its schema declares as maps, not its structs, which exist in
/// every object of the kind whether set or not.
fn nodes_of(value: &Value, schema: Option<&Value>, typed: bool) -> BTreeSet<FieldPath> {
    // A built-in kind's required fields (Go fields without `omitempty`) are in every
    // object, if only as null: writing them adds nothing.
    fn visit(
        value: &Value,
        schema: Option<&Value>,
        typed: bool,
        required: bool,
        path: FieldPath,
        set: &mut BTreeSet<FieldPath>,
    ) {
        let always_there = typed && required;
        match value {
            Value::Object(map) if !is_atomic_map(schema) => {
                let is_struct = schema.is_some_and(|s| s.get("properties").is_some());
                let root_or_metadata =
                    path.is_empty() || path[..] == [Elem::Field("metadata".into())];
                if !(root_or_metadata || always_there || typed && is_struct) {
                    set.insert(path.clone());
                }
                let required_here = |key: &str| {
                    schema
                        .and_then(|s| s["required"].as_array())
                        .is_some_and(|r| r.iter().any(|f| f == key))
                };
                for (key, child) in map {
                    if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind") {
                        continue;
                    }
                    if path[..] == [Elem::Field("metadata".into())]
                        && !TRACKED_METADATA.contains(&key.as_str())
                    {
                        continue;
                    }
                    let child_schema = if path.is_empty() && key == "metadata" {
                        None
                    } else {
                        child_schema(schema, key)
                    };
                    let mut child_path = path.clone();
                    child_path.push(Elem::Field(key.clone()));
                    visit(
                        child,
                        child_schema,
                        typed,
                        required_here(key),
                        child_path,
                        set,
                    );
                }
            }
            Value::Array(items) => match list_type(schema, &path) {
                ListType::Map(keys) if !keys.is_empty() => {
                    if !always_there {
                        set.insert(path.clone());
                    }
                    if path[..]
                        == [
                            Elem::Field("metadata".into()),
                            Elem::Field("ownerReferences".into()),
                        ]
                    {
                        return;
                    }
                    for item in items {
                        let mut item_path = path.clone();
                        item_path.push(Elem::Key(item_key(item, &keys)));
                        if let Some(fields) = item.as_object() {
                            let item_schema = items_schema(schema);
                            for (key, child) in fields {
                                let mut child_path = item_path.clone();
                                child_path.push(Elem::Field(key.clone()));
                                let required = item_schema
                                    .and_then(|s| s["required"].as_array())
                                    .is_some_and(|r| r.iter().any(|f| f == key));
                                visit(
                                    child,
                                    child_schema(item_schema, key),
                                    typed,
                                    required,
                                    child_path,
                                    set,
                                );
                            }
                        }
                    }
                }
                ListType::Set if !always_there => {
                    set.insert(path);
                }
                _ => {}
            },
            _ => {}
        }
    }
    let mut set = BTreeSet::new();
    visit(value, schema, typed, false, Vec::new(), &mut set);
    set
}

fn matches_key(item: &Value, key: &str) -> bool {
    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
        return false;
    };
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

/// The value at a path, if present.
pub fn value_at<'a>(value: &'a Value, path: &FieldPath) -> Option<&'a Value> {
    let mut current = value;
    for elem in path {
        current = match elem {
            Elem::Field(f) => current.get(f)?,
            Elem::Key(k) => current.as_array()?.iter().find(|i| matches_key(i, k))?,
            Elem::Item(v) => {
                let wanted: Value = serde_json::from_str(v).ok()?;
                current.as_array()?.iter().find(|i| **i == wanted)?
            }
        };
    }
    Some(current)
}

fn remove_at(value: &mut Value, path: &FieldPath) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for elem in parent_path {
        let next = match elem {
            Elem::Field(f) => current.get_mut(f),
            Elem::Key(k) => current
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| matches_key(i, k))),
            Elem::Item(_) => None,
        };
        match next {
            Some(next) => current = next,
            None => return,
        }
    }
    match last {
        Elem::Field(f) => {
            if let Some(map) = current.as_object_mut() {
                map.remove(f);
            }
        }
        Elem::Key(k) => {
            if let Some(items) = current.as_array_mut() {
                items.retain(|i| !matches_key(i, k));
            }
        }
        Elem::Item(v) => {
            if let (Some(items), Ok(wanted)) =
                (current.as_array_mut(), serde_json::from_str::<Value>(v))
            {
                items.retain(|i| *i != wanted);
            }
        }
    }
}

impl Elem {
    /// The key of this element in `FieldsV1`: `f:`, `k:` or `v:` and its text.
    fn fields_v1_key(&self) -> String {
        match self {
            Elem::Field(f) => format!("f:{f}"),
            Elem::Key(k) => format!("k:{k}"),
            Elem::Item(v) => format!("v:{v}"),
        }
    }
}

/// Encodes a field set as `FieldsV1` JSON.
pub fn to_fields_v1(set: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for elem in path {
            let key = elem.fields_v1_key();
            node = node
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("nodes are objects");
        }
    }
    // A member that also has members below it is marked with ".".
    for path in set {
        let mut node = &mut root;
        for elem in path {
            let key = elem.fields_v1_key();
            node = node
                .get_mut(&key)
                .and_then(Value::as_object_mut)
                .expect("built above");
        }
        if node.keys().any(|k| k != ".") {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// Decodes `FieldsV1` JSON into a field set.
pub fn from_fields_v1(fields: &Value) -> BTreeSet<FieldPath> {
    fn decode(node: &Value, path: &FieldPath, set: &mut BTreeSet<FieldPath>) {
        let Some(map) = node.as_object() else { return };
        for (key, child) in map {
            if key == "." {
                set.insert(path.clone());
                continue;
            }
            let elem = if let Some(f) = key.strip_prefix("f:") {
                Elem::Field(f.into())
            } else if let Some(k) = key.strip_prefix("k:") {
                // Canonical form, so the same key always compares equal.
                Elem::Key(
                    serde_json::from_str::<Value>(k)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|_| k.into()),
                )
            } else if let Some(v) = key.strip_prefix("v:") {
                Elem::Item(
                    serde_json::from_str::<Value>(v)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|_| v.into()),
                )
            } else {
                continue;
            };
            let mut child_path = path.clone();
            child_path.push(elem);
            if child.as_object().is_some_and(Map::is_empty) {
                set.insert(child_path);
            } else {
                decode(child, &child_path, set);
            }
        }
    }
    let mut set = BTreeSet::new();
    decode(fields, &Vec::new(), &mut set);
    set
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

pub fn read_entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| Entry {
                    manager: e["manager"].as_str().unwrap_or_default().into(),
                    operation: e["operation"].as_str().unwrap_or("Update").into(),
                    subresource: e["subresource"].as_str().unwrap_or_default().into(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
                    time: e["time"].as_str().unwrap_or_default().into(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_entries(object: &mut Value, entries: &[Entry]) {
    // The API server's order: appliers first, then by time (to the second), manager,
    // apiVersion and subresource.
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let list: Vec<Value> = sorted
        .into_iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut entry = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                entry["subresource"] = json!(e.subresource);
            }
            entry
        })
        .collect();
    if list.is_empty() {
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(list);
    }
}

/// Who is writing, for ownership bookkeeping.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub subresource: &'a str,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Records an ordinary write (create, update, non-apply patch) from `old` to `new`:
/// the writer owns what it changed, nobody keeps fields that are gone.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    schema: Option<&Value>,
    typed: bool,
    writer: &Writer,
) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let new_nodes = nodes_of(new, schema, typed);
    let old_nodes = old.map(|o| nodes_of(o, schema, typed)).unwrap_or_default();
    let mut new_fields = fields_of(new, schema);
    // A list item's membership moves only with the item itself: changing its fields
    // moves those fields, not the item.
    let mut changed: BTreeSet<FieldPath> = new_fields
        .iter()
        .filter(|path| match path.last() {
            Some(Elem::Key(_) | Elem::Item(_)) => old.and_then(|o| value_at(o, path)).is_none(),
            _ => old.and_then(|o| value_at(o, path)) != value_at(new, path),
        })
        .cloned()
        .collect();
    // A map or list this write brings into being is this writer's as a whole.
    changed.extend(new_nodes.difference(&old_nodes).cloned());
    new_fields.extend(new_nodes);
    for entry in &mut entries {
        entry.fields.retain(|p| new_fields.contains(p));
        if !(entry.manager == writer.manager && entry.operation == "Update") {
            entry.fields.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match entries.iter_mut().find(|e| {
            e.manager == writer.manager
                && e.operation == "Update"
                && e.subresource == writer.subresource
        }) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = writer.now.into();
                entry.api_version = writer.api_version.into();
            }
            None => entries.push(Entry {
                manager: writer.manager.into(),
                operation: "Update".into(),
                subresource: writer.subresource.into(),
                api_version: writer.api_version.into(),
                time: writer.now.into(),
                fields: changed,
            }),
        }
    }
    write_entries(new, &entries);
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The manager as the API server names it: `"helm"`, or for an ordinary writer
    /// `"kubectl-edit" using apps/v1`.
    pub manager: String,
    pub path: String,
}

/// How the API server names a manager in a conflict.
fn describe(entry: &Entry) -> String {
    let mut text = serde_json::to_string(&entry.manager).unwrap_or_default();
    if !entry.subresource.is_empty() {
        text.push_str(&format!(" with subresource {:?}", entry.subresource));
    }
    if entry.operation == "Update" {
        text.push_str(&format!(" using {}", entry.api_version));
    }
    text
}

/// Merges an applied configuration into an object (list maps by key, sets by value).
fn merge_applied(target: &mut Value, applied: &Value, schema: Option<&Value>, path: &FieldPath) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) if !is_atomic_map(schema) => {
            for (key, value) in applied {
                if value.is_null() {
                    target.remove(key);
                    continue;
                }
                let mut child_path = path.clone();
                child_path.push(Elem::Field(key.clone()));
                let child_schema = if path.is_empty() && key == "metadata" {
                    None
                } else {
                    child_schema(schema, key)
                };
                match target.get_mut(key) {
                    Some(existing) => merge_applied(existing, value, child_schema, &child_path),
                    None => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(target), Value::Array(applied)) => match list_type(schema, path) {
            ListType::Map(keys) if !keys.is_empty() => {
                for item in applied {
                    let key = item_key(item, &keys);
                    match target.iter_mut().find(|t| item_key(t, &keys) == key) {
                        Some(existing) => merge_applied(existing, item, items_schema(schema), &{
                            let mut p = path.clone();
                            p.push(Elem::Key(key));
                            p
                        }),
                        None => target.push(item.clone()),
                    }
                }
            }
            ListType::Set => {
                for item in applied {
                    if !target.contains(item) {
                        target.push(item.clone());
                    }
                }
            }
            _ => *target = applied.clone(),
        },
        (target, applied) => *target = applied.clone(),
    }
}

/// Server-side apply of `applied` onto `current` (None: the object does not exist yet).
/// Returns the new object with its managedFields, or the conflicts.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    schema: Option<&Value>,
    writer: &Writer,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let base = current.cloned().unwrap_or_else(|| json!({}));
    let mut entries = read_entries(&base);
    let applied_fields = fields_of(applied, schema);
    let is_mine = |e: &Entry| {
        e.manager == writer.manager && e.operation == "Apply" && e.subresource == writer.subresource
    };

    let mut conflicts = Vec::new();
    let mut forced: BTreeSet<FieldPath> = BTreeSet::new();
    let mut rivals: Vec<&Entry> = entries
        .iter()
        .filter(|e| !is_mine(e) && e.manager != writer.manager)
        .collect();
    rivals.sort_by(|a, b| (&a.manager, &a.operation).cmp(&(&b.manager, &b.operation)));
    for entry in rivals {
        let mut paths: Vec<&FieldPath> = entry
            .fields
            .intersection(&applied_fields)
            .filter(|path| !matches!(path.last(), Some(Elem::Key(_) | Elem::Item(_))))
            .filter(|path| value_at(&base, path) != value_at(applied, path))
            .collect();
        paths.sort_by(|a, b| walk_order(a, b));
        for path in paths {
            conflicts.push(Conflict {
                manager: describe(entry),
                path: path_to_string(path),
            });
            forced.insert(path.clone());
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for entry in entries.iter_mut().filter(|e| !is_mine(e)) {
        entry.fields.retain(|p| !forced.contains(p));
    }

    let mut merged = base.clone();
    merge_applied(&mut merged, applied, schema, &Vec::new());

    let previous: BTreeSet<FieldPath> = entries
        .iter()
        .find(|e| is_mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: BTreeSet<&FieldPath> = entries
        .iter()
        .filter(|e| !is_mine(e))
        .flat_map(|e| e.fields.iter())
        .collect();
    // Shallowest first: a list item goes as a whole (its key fields identify it, so
    // they must not be removed before it); its own fields then are no-ops.
    let mut dropped: Vec<&FieldPath> = previous
        .iter()
        .filter(|p| !applied_fields.contains(*p) && !others.contains(p))
        .collect();
    dropped.sort_by_key(|p| p.len());
    for path in dropped {
        remove_at(&mut merged, path);
    }

    entries.retain(|e| !is_mine(e));
    entries.push(Entry {
        manager: writer.manager.into(),
        operation: "Apply".into(),
        subresource: writer.subresource.into(),
        api_version: writer.api_version.into(),
        time: writer.now.into(),
        fields: applied_fields,
    });
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// Who owns what, as manager → field paths (`.spec.a`), for tests and diagnostics.
pub fn owners(object: &Value) -> BTreeMap<String, Vec<String>> {
    read_entries(object)
        .into_iter()
        .map(|e| (e.manager, e.fields.iter().map(path_to_string).collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            subresource: "",
            api_version: "v1",
            now: "2026-01-01T00:00:00Z",
        }
    }

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "a": {"type": "string"}, "b": {"type": "string"},
            "items": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                      "items": {"type": "object", "properties": {"name": {"type": "string"}, "v": {"type": "integer"}}}}}}}})
    }

    #[test]
    fn fields_v1_round_trips() {
        let obj = json!({"metadata": {"labels": {"x": "y"}, "finalizers": ["f"]},
            "spec": {"a": "1", "items": [{"name": "n", "v": 1}]}});
        let set = fields_of(&obj, Some(&schema()));
        let encoded = to_fields_v1(&set);
        assert_eq!(
            encoded["f:spec"]["f:items"]["k:{\"name\":\"n\"}"]["."],
            json!({})
        );
        assert_eq!(encoded["f:metadata"]["f:finalizers"]["v:\"f\""], json!({}));
        assert_eq!(from_fields_v1(&encoded), set);
    }

    #[test]
    fn a_field_no_longer_applied_is_removed() {
        let schema = schema();
        let first = json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "o"},
            "spec": {"a": "1", "b": "2", "items": [{"name": "x", "v": 1}, {"name": "y", "v": 2}]}});
        let obj = apply(None, &first, Some(&schema), &writer("m"), false).unwrap();
        let second = json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "o"},
            "spec": {"a": "1", "items": [{"name": "x", "v": 1}]}});
        let obj = apply(Some(&obj), &second, Some(&schema), &writer("m"), false).unwrap();
        assert_eq!(obj["spec"]["b"], Value::Null);
        assert_eq!(obj["spec"]["items"], json!([{"name": "x", "v": 1}]));
    }

    #[test]
    fn another_managers_field_conflicts_unless_forced() {
        let schema = schema();
        let mut obj = json!({"metadata": {"name": "o"}, "spec": {"a": "1"}});
        record_update(
            None,
            &mut obj,
            Some(&schema),
            false,
            &writer("kubectl-edit"),
        );
        let applied = json!({"metadata": {"name": "o"}, "spec": {"a": "2"}});
        let err = apply(Some(&obj), &applied, Some(&schema), &writer("helm"), false).unwrap_err();
        assert_eq!(
            err,
            vec![Conflict {
                manager: "\"kubectl-edit\" using v1".into(),
                path: ".spec.a".into()
            }]
        );
        // The same value is shared ownership, not a conflict.
        let same = json!({"metadata": {"name": "o"}, "spec": {"a": "1"}});
        assert!(apply(Some(&obj), &same, Some(&schema), &writer("helm"), false).is_ok());
        let forced = apply(Some(&obj), &applied, Some(&schema), &writer("helm"), true).unwrap();
        assert_eq!(forced["spec"]["a"], "2");
        let owners = owners(&forced);
        assert_eq!(owners["helm"], vec![".spec.a"]);
        // The writer that created `spec` keeps owning the map itself, as on a real server.
        assert_eq!(owners["kubectl-edit"], vec![".spec"]);
    }

    #[test]
    fn updates_take_ownership_of_changed_fields() {
        let schema = schema();
        let applied = json!({"metadata": {"name": "o"}, "spec": {"a": "1", "b": "1"}});
        let obj = apply(None, &applied, Some(&schema), &writer("m"), false).unwrap();
        let mut new = obj.clone();
        new["spec"]["b"] = json!("2");
        record_update(
            Some(&obj),
            &mut new,
            Some(&schema),
            false,
            &writer("kubectl-patch"),
        );
        let owners = owners(&new);
        assert_eq!(owners["m"], vec![".spec.a"]);
        assert_eq!(owners["kubectl-patch"], vec![".spec.b"]);
    }
}
