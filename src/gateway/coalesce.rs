//! Coalescing of progress reports: agents may report every step, but a job's status is
//! written at most about once per second, plus the final write at once. Pure
//! bookkeeping; the gateway's flusher does the writes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::api::patchjob::PatchJobStatus;

use super::story::Told;

/// Where a job's reports stand.
#[derive(Clone, Debug)]
struct Entry {
    /// Highest sequence accepted from the agent.
    accepted: i64,
    /// Highest sequence durably written to the job's status: what agents are told.
    written: i64,
    /// Status waiting to be written, with its sequence.
    pending: Option<(i64, PatchJobStatus)>,
    last_write: Option<Instant>,
    /// resourceVersion the gateway's last write left, for the next write's precondition.
    version: Option<String>,
    /// The job finished by someone else's write (the controller expired it) while a
    /// report waited: the agent's result can no longer land.
    overtaken: bool,
    /// A final status (Succeeded, Failed, …) was accepted from the agent: the job is
    /// over, whatever a lagging cache still says. Nothing newer is taken, and the job
    /// is not handed out again.
    finished: bool,
    /// What the job's Events have told so far (`None`: nothing written by this gateway).
    told: Option<Told>,
    /// The job's hand-out to its agent was told.
    assignment_told: bool,
}

impl Entry {
    fn new() -> Self {
        Self {
            accepted: 0,
            written: 0,
            pending: None,
            last_write: None,
            version: None,
            overtaken: false,
            finished: false,
            told: None,
            assignment_told: false,
        }
    }
}

/// What to do with one report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Newer than anything seen: queued.
    Queued,
    /// At or below the accepted sequence: ignored (a retry).
    Duplicate,
}

/// Progress of every job the gateway is handling.
#[derive(Debug, Default)]
pub struct ProgressBook {
    jobs: BTreeMap<String, Entry>,
    pub interval: Duration,
}

impl ProgressBook {
    pub fn new(interval: Duration) -> Self {
        Self {
            jobs: BTreeMap::new(),
            interval,
        }
    }

    /// Sets the sequence already stored in the job's status (after a restart).
    pub fn seed(&mut self, uid: &str, stored_sequence: i64) {
        let entry = self.jobs.entry(uid.to_string()).or_insert_with(Entry::new);
        entry.accepted = entry.accepted.max(stored_sequence);
        entry.written = entry.written.max(stored_sequence);
    }

    /// Highest sequence written to the API server; an agent keeps reporting until this
    /// reaches its own, so nothing is lost if the controller restarts meanwhile.
    pub fn written(&self, uid: &str) -> i64 {
        self.jobs.get(uid).map_or(0, |e| e.written)
    }

    /// Records a write of `sequence` that left the job at resourceVersion `version`.
    pub fn mark_written(&mut self, uid: &str, sequence: i64, version: Option<String>) {
        if let Some(entry) = self.jobs.get_mut(uid) {
            entry.written = entry.written.max(sequence);
            entry.version = version;
        }
    }

    /// resourceVersion the gateway's last write of this job left.
    pub fn version(&self, uid: &str) -> Option<String> {
        self.jobs.get(uid).and_then(|e| e.version.clone())
    }

    /// The job finished by another writer: what waits is dropped, later reports refused.
    pub fn overtake(&mut self, uid: &str) {
        let entry = self.jobs.entry(uid.to_string()).or_insert_with(Entry::new);
        entry.pending = None;
        entry.overtaken = true;
    }

    pub fn overtaken(&self, uid: &str) -> bool {
        self.jobs.get(uid).is_some_and(|e| e.overtaken)
    }

    /// Whether a final status of the job was accepted here: the job must not be handed
    /// out again, nor take a newer report.
    pub fn finished(&self, uid: &str) -> bool {
        self.jobs
            .get(uid)
            .is_some_and(|e| e.finished || e.overtaken)
    }

    pub fn accepted(&self, uid: &str) -> i64 {
        self.jobs.get(uid).map_or(0, |e| e.accepted)
    }

    pub fn report(&mut self, uid: &str, sequence: i64, status: PatchJobStatus) -> Accepted {
        let entry = self.jobs.entry(uid.to_string()).or_insert_with(Entry::new);
        if sequence <= entry.accepted || entry.overtaken || entry.finished {
            return Accepted::Duplicate;
        }
        entry.finished = status.phase.is_finished();
        entry.accepted = sequence;
        entry.pending = Some((sequence, status));
        Accepted::Queued
    }

    /// Statuses to write now: finished jobs at once, others when their interval passed.
    pub fn due(&mut self, now: Instant) -> Vec<(String, i64, PatchJobStatus)> {
        let interval = self.interval;
        let mut out = Vec::new();
        for (uid, entry) in &mut self.jobs {
            let Some((_, status)) = &entry.pending else {
                continue;
            };
            let finished = status.phase.is_finished();
            let waited = entry
                .last_write
                .is_none_or(|last| now.duration_since(last) >= interval);
            if finished || waited {
                let (sequence, status) = entry.pending.take().expect("checked above");
                entry.last_write = Some(now);
                out.push((uid.clone(), sequence, status));
            }
        }
        out
    }

    /// Puts a status back after a failed write, unless a newer one arrived meanwhile.
    pub fn retry(&mut self, uid: &str, sequence: i64, status: PatchJobStatus) {
        if let Some(entry) = self.jobs.get_mut(uid)
            && entry
                .pending
                .as_ref()
                .is_none_or(|(pending, _)| *pending < sequence)
        {
            entry.pending = Some((sequence, status));
            entry.last_write = None;
        }
    }

    /// What the job's Events told, as of this gateway's last write of it.
    pub fn told(&self, uid: &str) -> Option<Told> {
        self.jobs.get(uid).and_then(|e| e.told.clone())
    }

    pub fn set_told(&mut self, uid: &str, told: Told) {
        if let Some(entry) = self.jobs.get_mut(uid) {
            entry.told = Some(told);
        }
    }

    /// True the first time it is asked for a job: its hand-out is told once.
    pub fn tell_assignment(&mut self, uid: &str) -> bool {
        let entry = self.jobs.entry(uid.to_string()).or_insert_with(Entry::new);
        !std::mem::replace(&mut entry.assignment_told, true)
    }

    pub fn forget(&mut self, uid: &str) {
        self.jobs.remove(uid);
    }

    /// Jobs with nothing waiting to be written: the ones [`Self::forget`] may drop once
    /// their PatchJob is gone.
    pub fn idle(&self) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, entry)| entry.pending.is_none())
            .map(|(uid, _)| uid.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::patchjob::JobPhase;

    fn status(phase: JobPhase) -> PatchJobStatus {
        PatchJobStatus {
            phase,
            ..Default::default()
        }
    }

    #[test]
    fn reports_are_idempotent_and_coalesced() {
        let mut book = ProgressBook::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(
            book.report("j", 1, status(JobPhase::Running)),
            Accepted::Queued
        );
        assert_eq!(book.due(t0).len(), 1, "the first report is written at once");
        for sequence in 2..=20 {
            book.report("j", sequence, status(JobPhase::Running));
        }
        assert_eq!(
            book.report("j", 5, status(JobPhase::Running)),
            Accepted::Duplicate
        );
        assert!(
            book.due(t0 + Duration::from_millis(500)).is_empty(),
            "within the interval nothing is written"
        );
        let written = book.due(t0 + Duration::from_millis(1000));
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].1, 20, "only the newest status is written");
        book.report("j", 21, status(JobPhase::Succeeded));
        assert_eq!(
            book.due(t0 + Duration::from_millis(1100)).len(),
            1,
            "a final status is written at once"
        );
        assert_eq!(book.accepted("j"), 21);
        assert_eq!(
            book.written("j"),
            0,
            "nothing is acknowledged before it is written"
        );
        book.mark_written("j", 21, Some("7".into()));
        assert_eq!(book.written("j"), 21);
        assert_eq!(book.version("j").as_deref(), Some("7"));
    }

    #[test]
    fn a_job_finished_elsewhere_takes_no_more_reports() {
        let mut book = ProgressBook::new(Duration::from_secs(1));
        book.report("j", 4, status(JobPhase::Succeeded));
        book.overtake("j");
        assert!(
            book.due(Instant::now()).is_empty(),
            "the waiting report is dropped"
        );
        assert!(book.overtaken("j"));
        assert_eq!(
            book.report("j", 5, status(JobPhase::Failed)),
            Accepted::Duplicate
        );
    }

    #[test]
    fn nothing_follows_a_final_report() {
        let mut book = ProgressBook::new(Duration::from_secs(1));
        book.report("j", 3, status(JobPhase::Running));
        assert!(!book.finished("j"));
        book.report("j", 4, status(JobPhase::Succeeded));
        assert!(
            book.finished("j"),
            "a final status ends the job here at once"
        );
        let now = Instant::now();
        assert_eq!(book.due(now).len(), 1);
        book.mark_written("j", 4, Some("9".into()));
        assert_eq!(
            book.report("j", 5, status(JobPhase::Running)),
            Accepted::Duplicate,
            "a report after the final one cannot reopen the job"
        );
        assert!(book.due(now).is_empty());
        assert_eq!(book.accepted("j"), 4);
    }

    #[test]
    fn a_failed_write_is_retried_unless_superseded() {
        let mut book = ProgressBook::new(Duration::from_secs(1));
        let now = Instant::now();
        book.report("j", 3, status(JobPhase::Running));
        let (uid, sequence, written) = book.due(now).remove(0);
        book.retry(&uid, sequence, written.clone());
        assert_eq!(book.due(now).len(), 1);
        book.seed("k", 7);
        assert_eq!(
            book.report("k", 7, status(JobPhase::Running)),
            Accepted::Duplicate
        );
    }

    #[test]
    fn only_jobs_with_nothing_to_write_are_idle() {
        let mut book = ProgressBook::new(Duration::from_secs(1));
        let now = Instant::now();
        book.report("done", 2, status(JobPhase::Succeeded));
        book.due(now);
        book.report("busy", 1, status(JobPhase::Running));
        book.due(now);
        book.report("busy", 2, status(JobPhase::Running));
        assert_eq!(book.idle(), vec!["done".to_string()]);
        book.forget("done");
        assert_eq!(book.written("done"), 0);
        assert!(book.idle().is_empty());
    }
}
