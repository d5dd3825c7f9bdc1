//! `--data-dir` persistence: an append-only journal of object writes and deletions
//! (`objects.jsonl`, one JSON record a line), replayed and compacted at start-up, so
//! objects survive a restart and resourceVersions keep rising.
//!
//! Every record carries the resourceVersion of the write; after a restart the store
//! continues above the highest one. A torn last line (a crash mid-write) is skipped.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot use data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode a journal record: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Serialize, Deserialize)]
struct Record {
    rv: u64,
    /// Storage key of the resource, `group/plural`.
    res: String,
    ns: String,
    name: String,
    /// The object after the write; absent for a deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    obj: Option<Value>,
}

/// What the journal held at start-up.
#[derive(Default)]
pub struct Loaded {
    pub resource_version: u64,
    /// storage key → (namespace, name) → object
    pub objects: HashMap<String, BTreeMap<(String, String), Value>>,
}

/// Rewrite the journal once it has grown past this and 4x its last snapshot.
const COMPACT_AFTER_BYTES: u64 = 64 << 20;

pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the file now, and right after the last snapshot.
    written: u64,
    snapshot_bytes: u64,
}

/// Writes `objects.jsonl` afresh (via a temporary file and a rename): a marker
/// record holding `rv`, then one record per object. Returns its size.
fn write_snapshot<'a>(
    dir: &Path,
    rv: u64,
    objects: impl Iterator<Item = (&'a str, &'a str, &'a str, &'a Value)>,
) -> Result<u64, JournalError> {
    let tmp = dir.join("objects.jsonl.tmp");
    let path = dir.join("objects.jsonl");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Io { path, source }
    };
    let mut bytes = 0u64;
    {
        let mut out = BufWriter::new(File::create(&tmp).map_err(io(&tmp))?);
        // The marker keeps the highest resourceVersion even when every object is gone.
        let marker = serde_json::to_string(&Record {
            rv,
            res: String::new(),
            ns: String::new(),
            name: String::new(),
            obj: None,
        })?;
        writeln!(out, "{marker}").map_err(io(&tmp))?;
        bytes += marker.len() as u64 + 1;
        for (res, ns, name, obj) in objects {
            let object_rv = obj["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(rv);
            #[derive(Serialize)]
            struct RecordRef<'b> {
                rv: u64,
                res: &'b str,
                ns: &'b str,
                name: &'b str,
                obj: &'b Value,
            }
            let line = serde_json::to_string(&RecordRef {
                rv: object_rv,
                res,
                ns,
                name,
                obj,
            })?;
            writeln!(out, "{line}").map_err(io(&tmp))?;
            bytes += line.len() as u64 + 1;
        }
        out.flush().map_err(io(&tmp))?;
        out.get_ref().sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(bytes)
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, replays it, and rewrites it
    /// compacted so it holds one record per live object.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), JournalError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("objects.jsonl");
        let mut loaded = Loaded::default();
        if path.exists() {
            let file = File::open(&path).map_err(io(&path))?;
            for line in BufReader::new(file).lines() {
                let line = line.map_err(io(&path))?;
                let Ok(record) = serde_json::from_str::<Record>(&line) else {
                    tracing::warn!(path = %path.display(), "skipping an unreadable journal line");
                    continue;
                };
                loaded.resource_version = loaded.resource_version.max(record.rv);
                let objects = loaded.objects.entry(record.res).or_default();
                match record.obj {
                    Some(obj) => {
                        objects.insert((record.ns, record.name), obj);
                    }
                    None => {
                        objects.remove(&(record.ns, record.name));
                    }
                }
            }
        }
        // Compact: write the live objects to a new file and swap it in atomically.
        let snapshot_bytes = write_snapshot(
            dir,
            loaded.resource_version,
            loaded.objects.iter().flat_map(|(res, objects)| {
                objects
                    .iter()
                    .map(move |((ns, name), obj)| (res.as_str(), ns.as_str(), name.as_str(), obj))
            }),
        )?;
        loaded.objects.retain(|res, _| !res.is_empty());
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((
            Self {
                path,
                out: BufWriter::new(file),
                written: snapshot_bytes,
                snapshot_bytes,
            },
            loaded,
        ))
    }

    /// True when the journal has grown well past its last snapshot, so a rewrite
    /// (`compact`) is worth it.
    pub fn wants_compaction(&self) -> bool {
        self.written > COMPACT_AFTER_BYTES && self.written > 4 * self.snapshot_bytes
    }

    /// Rewrites the journal as one record per live object.
    pub fn compact<'a>(
        &mut self,
        rv: u64,
        objects: impl Iterator<Item = (&'a str, &'a str, &'a str, &'a Value)>,
    ) -> Result<(), JournalError> {
        let dir = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let bytes = write_snapshot(&dir, rv, objects)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.out = BufWriter::new(file);
        self.written = bytes;
        self.snapshot_bytes = bytes;
        tracing::info!(bytes, "compacted the dev server journal");
        Ok(())
    }

    /// Appends one write (`obj` = Some) or deletion (`obj` = None).
    pub fn append(
        &mut self,
        rv: u64,
        res: &str,
        ns: &str,
        name: &str,
        obj: Option<&Value>,
    ) -> Result<(), JournalError> {
        #[derive(Serialize)]
        struct RecordRef<'a> {
            rv: u64,
            res: &'a str,
            ns: &'a str,
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            obj: Option<&'a Value>,
        }
        let line = serde_json::to_string(&RecordRef {
            rv,
            res,
            ns,
            name,
            obj,
        })?;
        let path = self.path.clone();
        let io = move |source| JournalError::Io { path, source };
        self.out.write_all(line.as_bytes()).map_err(io.clone())?;
        self.out.write_all(b"\n").map_err(io.clone())?;
        self.written += line.len() as u64 + 1;
        // Flushed per write: the OS has it, so a killed server loses nothing.
        self.out.flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replays_writes_and_deletions_and_keeps_the_highest_version() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut journal, loaded) = Journal::open(dir.path()).unwrap();
            assert_eq!(loaded.resource_version, 0);
            let a = json!({"metadata": {"name": "a", "resourceVersion": "1"}});
            let b = json!({"metadata": {"name": "b", "resourceVersion": "2"}});
            journal
                .append(1, "/configmaps", "ns", "a", Some(&a))
                .unwrap();
            journal
                .append(2, "/configmaps", "ns", "b", Some(&b))
                .unwrap();
            journal.append(3, "/configmaps", "ns", "a", None).unwrap();
        }
        let (_, loaded) = Journal::open(dir.path()).unwrap();
        assert_eq!(loaded.resource_version, 3);
        let objects = &loaded.objects["/configmaps"];
        assert_eq!(objects.len(), 1);
        assert!(objects.contains_key(&("ns".to_string(), "b".to_string())));
        // Compaction kept the version even though the last write was a deletion.
        let (mut journal, again) = Journal::open(dir.path()).unwrap();
        assert_eq!(again.resource_version, 3);
        assert!(!journal.wants_compaction());
        let b = json!({"metadata": {"name": "b", "resourceVersion": "2"}});
        journal
            .compact(7, std::iter::once(("/configmaps", "ns", "b", &b)))
            .unwrap();
        journal
            .append(8, "/configmaps", "ns", "c", Some(&b))
            .unwrap();
        let (_, after) = Journal::open(dir.path()).unwrap();
        assert_eq!(after.resource_version, 8);
        assert_eq!(after.objects["/configmaps"].len(), 2);
    }
}
