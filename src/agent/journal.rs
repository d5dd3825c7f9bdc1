//! The agent's journal: one JSON file per job in the state directory, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory) after every step,
//! so a crash or a reboot resumes the job where it stopped. Only root reads it (the
//! directory is 0700, the files 0600: they hold scripts and their output). A file that
//! cannot be read back is moved aside to `jobs/corrupt/` and reported, never a reason
//! for the agent to stop.
//!
//! A finished job whose result the gateway holds leaves the journal but not the agent's
//! memory: it is *retired* to `jobs/done/`, a small file named by the digest of the
//! job's namespace, name and spec, kept until well after the job's deadline. A job
//! handed out again — by a gateway whose cache lags its own final write, or as a copy
//! of a signed job recreated under its old name — is recognised and never run twice.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::patchjob::{PatchJobSpec, PatchJobStatus};

/// Everything the agent knows about one job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// Stable job identity: the PatchJob uid, or a local id for `agent exec`.
    pub id: String,
    /// Human-readable name (namespace/name of the PatchJob, or the workflow for local runs).
    pub name: String,
    pub spec: PatchJobSpec,
    pub status: PatchJobStatus,
    /// Boot id of the host when the job's reboot was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id_at_reboot: Option<String>,
    /// Incremented on every change; reports carry it so the gateway can drop stale ones.
    pub sequence: i64,
    /// Highest sequence the gateway acknowledged.
    #[serde(default)]
    pub acknowledged_sequence: i64,
}

impl JobRecord {
    pub fn is_finished(&self) -> bool {
        self.status.phase.is_finished()
    }

    /// Whether the status fits the spec: one result per action, in the spec's order.
    /// A record that does not (a damaged or tampered file) is not resumed.
    pub fn is_consistent(&self) -> bool {
        let fits = |results: &[crate::api::patchjob::ActionResult],
                    actions: &[crate::api::patchjob::ResolvedAction]| {
            results.len() == actions.len()
                && results.iter().zip(actions).all(|(r, a)| r.name == a.name)
        };
        fits(&self.status.pre_actions, &self.spec.pre_actions)
            && fits(&self.status.post_actions, &self.spec.post_actions)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {path} is unreadable or does not fit its job; moved to {moved:?}")]
    Quarantined {
        path: PathBuf,
        moved: Option<PathBuf>,
    },
}

/// Most retired jobs remembered; past this the oldest are forgotten first.
pub const MAX_RETIRED: usize = 4096;
/// How long a retired job is remembered after its deadline (or after it finished, for a
/// job without one).
const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What identifies a job's work on a host. A plan's job is its host's one job of one
/// run: its namespace/name, plan and run, whatever else its spec says — a job the
/// controller creates again in the same run (once its author deleted the first and
/// stripped the finalizer that kept it counted) has a new deadline, but is the same
/// run's work. A job of no plan (`agent exec`) is its namespace/name and whole spec. A
/// signed copy recreated under the job's name has a new uid but this same digest.
pub fn job_digest(name: &str, spec: &PatchJobSpec) -> String {
    let body = if spec.plan.is_empty() || spec.run.is_empty() {
        serde_json::to_vec(&(name, spec))
    } else {
        serde_json::to_vec(&("run", name, &spec.plan, &spec.run))
    }
    .expect("a spec serializes");
    hex::encode(Sha256::digest(&body))
}

/// A retired job: which uid ran, and until when it is remembered.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Retired {
    uid: String,
    /// Seconds since the epoch.
    until: i64,
}

/// The journal directory (`STATE_DIR/jobs`).
#[derive(Clone, Debug)]
pub struct Journal {
    dir: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let dir = state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error(&dir))?;
        }
        Ok(Self { dir })
    }

    /// Moves an unreadable journal file to `jobs/corrupt/`, so the agent goes on with the
    /// others; returns where it went.
    fn quarantine(&self, path: &Path) -> Option<PathBuf> {
        let aside = self.dir.join("corrupt");
        std::fs::create_dir_all(&aside).ok()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let target = aside.join(format!("{}.{stamp}", path.file_name()?.to_string_lossy()));
        std::fs::rename(path, &target).ok()?;
        Some(target)
    }

    fn path(&self, id: &str) -> PathBuf {
        let safe: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// Writes `record` so that a reader sees either the old or the new file, never a mix.
    pub fn save(&self, record: &JobRecord) -> Result<(), JournalError> {
        let path = self.path(&record.id);
        let temporary = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(record).expect("job records serialize");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary).map_err(io_error(&temporary))?;
        file.write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(io_error(&temporary))?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
        // The rename itself must survive a power cut: sync the directory entry.
        #[cfg(unix)]
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(())
    }

    /// The journaled job `id`, if any. A file that cannot be read back, or does not fit
    /// its own job, is moved aside and reported as [`JournalError::Quarantined`]: the
    /// job it held must not be run again from the start.
    pub fn load(&self, id: &str) -> Result<Option<JobRecord>, JournalError> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        match serde_json::from_slice::<JobRecord>(&bytes) {
            Ok(record) if record.is_consistent() => Ok(Some(record)),
            _ => {
                let moved = self.quarantine(&path);
                Err(JournalError::Quarantined { path, moved })
            }
        }
    }

    /// Every job in the journal, oldest file first.
    pub fn all(&self) -> Result<Vec<JobRecord>, JournalError> {
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)
            .map_err(io_error(&self.dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                (
                    p.metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH),
                    p,
                )
            })
            .collect();
        entries.sort();
        let mut records = Vec::new();
        for (_, path) in entries {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                // Retired (or quarantined) since the directory was listed.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(JournalError::Io { path, source }),
            };
            match serde_json::from_slice::<JobRecord>(&bytes) {
                Ok(record) if record.is_consistent() => records.push(record),
                Ok(_) => {
                    let moved = self.quarantine(&path);
                    tracing::error!(
                        file = %path.display(),
                        moved_to = %moved.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                        "a journal file does not fit its own job (damaged or edited); it was moved aside and its job is not resumed"
                    );
                }
                Err(err) => {
                    let moved = self.quarantine(&path);
                    tracing::error!(
                        file = %path.display(),
                        moved_to = %moved.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                        error = %err,
                        "a journal file is unreadable; it was moved aside and its job is not resumed"
                    );
                }
            }
        }
        Ok(records)
    }

    /// Jobs that have not finished, oldest first.
    pub fn unfinished(&self) -> Result<Vec<JobRecord>, JournalError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|r| !r.is_finished())
            .collect())
    }

    fn retired_dir(&self) -> PathBuf {
        self.dir.join("done")
    }

    /// Drops a finished job from the journal and remembers that it ran (see the module
    /// documentation), forgetting the oldest memories past [`MAX_RETIRED`].
    pub fn retire(&self, record: &JobRecord) -> Result<(), JournalError> {
        let dir = self.retired_dir();
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let from = record
            .spec
            .deadline
            .as_ref()
            .map_or(now, |deadline| deadline.0.as_second().max(now));
        let retired = Retired {
            uid: record.id.clone(),
            until: from.saturating_add(RETIRED_FOR.as_secs() as i64),
        };
        // Written as durably as a journal entry: it is what keeps the job from running
        // twice once the entry is gone.
        let path = dir.join(job_digest(&record.name, &record.spec));
        let temporary = path.with_extension("tmp");
        std::fs::write(
            &temporary,
            serde_json::to_vec(&retired).expect("serializes"),
        )
        .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
        .map_err(io_error(&temporary))?;
        std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
        #[cfg(unix)]
        std::fs::File::open(&dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&dir))?;
        self.remove(&record.id)?;
        self.prune_retired(now);
        Ok(())
    }

    /// The uid of a job with this digest that is in the journal now (running, or
    /// finished and not yet retired), if any.
    pub fn holding(&self, digest: &str) -> Option<String> {
        self.all()
            .ok()?
            .into_iter()
            .find(|record| job_digest(&record.name, &record.spec) == digest)
            .map(|record| record.id)
    }

    /// The uid of the job with this digest that already ran here, if any.
    pub fn retired(&self, digest: &str) -> Option<String> {
        let bytes = std::fs::read(self.retired_dir().join(digest)).ok()?;
        serde_json::from_slice::<Retired>(&bytes)
            .ok()
            .map(|retired| retired.uid)
    }

    /// Forgets retired jobs past their time, then the oldest beyond [`MAX_RETIRED`].
    fn prune_retired(&self, now: i64) {
        let Ok(entries) = std::fs::read_dir(self.retired_dir()) else {
            return;
        };
        let mut kept: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "tmp") {
                continue; // being written by another retirement
            }
            let expired = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Retired>(&bytes).ok())
                .is_none_or(|retired| retired.until < now);
            if expired {
                let _ = std::fs::remove_file(&path);
            } else {
                let modified = path.metadata().and_then(|m| m.modified());
                kept.push((modified.unwrap_or(std::time::UNIX_EPOCH), path));
            }
        }
        if kept.len() > MAX_RETIRED {
            kept.sort();
            for (_, path) in &kept[..kept.len() - MAX_RETIRED] {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), JournalError> {
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(JournalError::Io { path, source: err })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::patchjob::JobPhase;

    fn record(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            name: "team/job".into(),
            spec: PatchJobSpec::bare("host", "", ""),
            status: PatchJobStatus::default(),
            boot_id_at_reboot: None,
            sequence: 1,
            acknowledged_sequence: 0,
        }
    }

    #[test]
    fn a_retired_job_is_remembered_by_what_it_ran_not_by_its_uid() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut job = record("uid-1");
        job.status.phase = JobPhase::Succeeded;
        journal.save(&job).unwrap();
        let digest = job_digest(&job.name, &job.spec);
        assert_eq!(journal.retired(&digest), None);
        journal.retire(&job).unwrap();
        assert_eq!(journal.load("uid-1").unwrap(), None, "it left the journal");
        // A copy under a new uid has the same digest; another job does not.
        let copy = record("uid-2");
        assert_eq!(
            journal.retired(&job_digest(&copy.name, &copy.spec)),
            Some("uid-1".to_string())
        );
        let mut other = record("uid-3");
        other.spec.run = "r2".into();
        assert_eq!(journal.retired(&job_digest(&other.name, &other.spec)), None);
        // Reopened (the agent restarted), it still remembers.
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(reopened.retired(&digest), Some("uid-1".to_string()));
    }

    #[test]
    fn retired_jobs_are_forgotten_once_past_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let old = record("old");
        std::fs::create_dir_all(journal.retired_dir()).unwrap();
        let stale = Retired {
            uid: "old".into(),
            until: 1,
        };
        let digest = job_digest(&old.name, &old.spec);
        std::fs::write(
            journal.retired_dir().join(&digest),
            serde_json::to_vec(&stale).unwrap(),
        )
        .unwrap();
        let mut fresh = record("fresh");
        fresh.spec.run = "r2".into();
        journal.retire(&fresh).unwrap();
        assert_eq!(journal.retired(&digest), None, "past its time");
        assert!(
            journal
                .retired(&job_digest(&fresh.name, &fresh.spec))
                .is_some()
        );
    }

    #[test]
    fn saved_records_load_back_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut job = record("uid/with:odd chars");
        journal.save(&job).unwrap();
        job.sequence = 2;
        job.status.phase = JobPhase::Succeeded;
        journal.save(&job).unwrap();
        assert_eq!(
            journal.load("uid/with:odd chars").unwrap(),
            Some(job.clone())
        );
        assert!(journal.unfinished().unwrap().is_empty());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["uid_with_odd_chars.json"]);
        journal.remove(&job.id).unwrap();
        assert_eq!(journal.load(&job.id).unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_the_others_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.save(&record("good")).unwrap();
        std::fs::write(dir.path().join("jobs/bad.json"), "{not json").unwrap();
        // A record whose results do not fit its actions (edited by hand, say).
        let mut misfit = record("misfit");
        misfit.status.post_actions.push(Default::default());
        journal.save(&misfit).unwrap();
        let loaded = journal.all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, "good");
        assert!(!dir.path().join("jobs/bad.json").exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path().join("jobs/corrupt"))
            .unwrap()
            .collect();
        assert_eq!(aside.len(), 2, "both kept for a person to look at");
        assert_eq!(
            journal.all().unwrap().len(),
            1,
            "and not tripped over again"
        );
    }

    #[cfg(unix)]
    #[test]
    fn only_root_reads_the_journal() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.save(&record("j")).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("jobs")), 0o700);
        assert_eq!(mode(&dir.path().join("jobs/j.json")), 0o600);
    }

    /// A full disk: writes to /dev/full fail with ENOSPC, which the journal reports
    /// as an error (the agent reports the job instead of dying).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join("jobs/full.json.tmp")).unwrap();
        match journal.save(&record("full")) {
            Err(JournalError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(nix::libc::ENOSPC), "{source}")
            }
            other => panic!("expected ENOSPC, got {other:?}"),
        }
    }

    #[test]
    fn a_corrupt_journal_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("jobs/bad.json"), "{not json").unwrap();
        assert!(matches!(
            journal.load("bad"),
            Err(JournalError::Quarantined { moved: Some(_), .. })
        ));
        assert!(matches!(journal.load("bad"), Ok(None)), "moved aside once");
    }

    /// Attack (timing; a hostile script can widen it by making the agent busy): the
    /// agent's delivery task retires a finished job — removing its journal file — while
    /// the work loop reads the whole journal (`unfinished()` at the top of every
    /// iteration, `all()` after every job). A file listed by `read_dir` and gone before
    /// it is read makes `all()` fail, and the work loop propagates that with `?`: `agent
    /// run` exits with an error in the middle of its loop (and a node agent's pod
    /// restarts). A file that vanished was retired, not damaged: it must simply be
    /// skipped.
    #[test]
    fn reading_the_journal_while_a_job_is_retired_is_not_an_error() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let retiring = {
            let journal = journal.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..400 {
                    let mut job = record(&format!("uid-{i}"));
                    job.spec.run = format!("r{i}");
                    job.status.phase = JobPhase::Succeeded;
                    journal.save(&job).unwrap();
                    journal.retire(&job).unwrap();
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut failures = Vec::new();
        while !done.load(Ordering::SeqCst) {
            if let Err(err) = journal.all() {
                failures.push(err.to_string());
            }
        }
        retiring.join().unwrap();
        assert!(
            failures.is_empty(),
            "{} reads of the journal failed while jobs were retired, e.g. {}",
            failures.len(),
            failures[0]
        );
    }
}
