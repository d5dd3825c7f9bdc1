//! Jobs going out and results coming back. Assignments are long-polled and carry the
//! full spec, fetched once from the API server because the shared job cache holds no
//! script bodies. Reports are checked ([`protocol::accept_report`]), refused once a job
//! is finished (a finished job is final), coalesced ([`ProgressBook`]) and written with
//! the resourceVersion they were checked against, so a write never lands on a state
//! it did not see — a job that expired meanwhile stays expired.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use crate::api::agent::Agent;
use crate::api::patchjob::{PatchJob, PatchJobSpec, PatchJobStatus};
use crate::api_errors;
use crate::field_manager;

use super::auth::Identity;
use super::coalesce::Accepted;
use super::jobs::serving_problem;
use super::protocol::{self, Assignment, ProgressAck, ProgressReport, encode_spec};
use super::story::{self, Told};
use super::{Gateway, Refusal};

/// The job as the shared cache keeps it: no script bodies (their SHA-256 stays, which
/// is what the signature and the agent check), and of a finished job only its outcome.
/// Jobs are the biggest objects in the controller's memory by far.
pub fn strip_for_cache(job: &mut PatchJob) {
    job.metadata.managed_fields = None;
    for action in job
        .spec
        .pre_actions
        .iter_mut()
        .chain(job.spec.post_actions.iter_mut())
    {
        for script in action
            .script
            .iter_mut()
            .chain(action.detection_script.iter_mut())
        {
            script.content = String::new();
        }
    }
    if let Some(status) = &mut job.status
        && status.phase.is_finished()
    {
        for action in status
            .pre_actions
            .iter_mut()
            .chain(status.post_actions.iter_mut())
        {
            action.message = String::new();
        }
        if let Some(patches) = &mut status.patches {
            patches.installed = Vec::new();
            patches.failed = Vec::new();
        }
        status.conditions = Vec::new();
    }
}

/// What the shared cache keeps of a job: [`strip_for_cache`], and of a job without the
/// controller's signature — served to nobody, and holding whatever its author wrote —
/// only what the index and the reconcilers look at: its metadata but annotations, its
/// agent, node, plan and run, and where it stands. So hand-written jobs, however large,
/// cost the cache little.
pub fn project_job(job: &mut PatchJob, signer: &super::jobs::JobSigner) {
    use crate::api::common::{
        AGENT_LABEL, PLAN_LABEL, REBOOT_DECISION_ANNOTATION, REBOOT_MESSAGE_ANNOTATION,
        RUN_FINALIZER, RUN_LABEL,
    };
    let signed = signer.verify(job);
    strip_for_cache(job);
    // Of the metadata anyone may add to, only what fleetpatch reads, bounded: the
    // signature covers the spec, not the labels, annotations or finalizers.
    let meta = &mut job.metadata;
    meta.owner_references = None;
    if let Some(labels) = &mut meta.labels {
        labels.retain(|key, _| [PLAN_LABEL, RUN_LABEL, AGENT_LABEL].contains(&key.as_str()));
    }
    if let Some(finalizers) = &mut meta.finalizers {
        finalizers.retain(|f| f == RUN_FINALIZER);
    }
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| {
            [
                super::jobs::SIGNATURE_ANNOTATION,
                REBOOT_DECISION_ANNOTATION,
                REBOOT_MESSAGE_ANNOTATION,
            ]
            .contains(&key.as_str())
        });
        let max = crate::controller::drain::MAX_REBOOT_MESSAGE;
        for value in annotations.values_mut() {
            if value.len() > max {
                *value = protocol::bounded(value, max);
            }
        }
    }
    if signed {
        return;
    }
    job.metadata.annotations = None;
    let spec = &mut job.spec;
    spec.pre_actions = Vec::new();
    spec.post_actions = Vec::new();
    spec.workflow = None;
    spec.patches = Default::default();
    if let Some(status) = job.status.take() {
        job.status = Some(PatchJobStatus {
            phase: status.phase,
            start_time: status.start_time,
            completion_time: status.completion_time,
            last_sequence: status.last_sequence,
            ..Default::default()
        });
    }
}

/// Whether the job's deadline has passed: such a job is never handed out (anew), so a
/// signed copy of an old job, recreated under its name, runs nowhere.
fn past_deadline(job: &PatchJob, now: Timestamp) -> bool {
    job.spec
        .deadline
        .as_ref()
        .is_some_and(|deadline| deadline.0 <= now)
}

/// The span of work on `job` (see `crate::logs`).
pub(super) fn job_span(job: &PatchJob) -> tracing::Span {
    crate::logs::job_span(
        job.metadata.namespace.as_deref().unwrap_or_default(),
        job.metadata.name.as_deref().unwrap_or_default(),
        &job.spec.run,
        &job.spec.agent,
    )
}

/// Whether a cached job's spec still has its script bodies.
fn has_bodies(spec: &PatchJobSpec) -> bool {
    spec.pre_actions
        .iter()
        .chain(&spec.post_actions)
        .flat_map(|a| a.script.iter().chain(a.detection_script.iter()))
        .all(|script| !script.content.is_empty())
}

impl Gateway {
    fn agent(&self, identity: &Identity) -> Result<Arc<Agent>, Refusal> {
        self.caches
            .agents
            .get(&kube::runtime::reflector::ObjectRef::new(&identity.agent))
            .ok_or(Refusal::Unauthorized)
    }

    /// Whether `job` may be served to the caller; 403 with why otherwise.
    pub(super) fn check_serving(&self, identity: &Identity, job: &PatchJob) -> Result<(), Refusal> {
        let agent = self.agent(identity)?;
        serving_problem(
            job,
            &agent,
            identity.node.as_deref(),
            &self.signer,
            &self.caches.namespaces,
            &self.config.namespace,
        )
        .map_err(|why| {
            tracing::warn!(agent = %identity.agent, job = %job.name_any(), reason = %why, "job not served");
            Refusal::Forbidden(why.to_string())
        })
    }

    /// The caller's unfinished jobs that may be served to it, with their full specs.
    pub(super) async fn assignments_for(
        &self,
        identity: &Identity,
    ) -> Result<Vec<Assignment>, Refusal> {
        let mut out = Vec::new();
        // A paused agent gets no work; its running job is cancelled by the heartbeat.
        if self.paused(&identity.agent) {
            return Ok(out);
        }
        let now = Timestamp::now();
        for job in self.job_signals.jobs_of(&identity.agent, &self.caches.jobs) {
            let Some(uid) = job.uid() else { continue };
            // The cache may lag the final write this replica made a moment ago: the
            // progress book knows the job is over before the cache does.
            if job.metadata.deletion_timestamp.is_some()
                || job.status.as_ref().is_some_and(|s| s.phase.is_finished())
                || self.progress.lock().finished(&uid)
                || past_deadline(&job, now)
                || self.check_serving(identity, &job).is_err()
            {
                continue;
            }
            let Some(spec) = self.full_spec(identity, &job, &uid).await? else {
                continue;
            };
            let stored = job
                .status
                .as_ref()
                .and_then(|s| s.last_sequence)
                .unwrap_or(0);
            let (acknowledged, newly_assigned) = {
                let mut book = self.progress.lock();
                book.seed(&uid, stored);
                let newly = stored == 0 && book.tell_assignment(&uid);
                (book.written(&uid), newly)
            };
            if newly_assigned {
                self.tell(&job, vec![story::assigned(&identity.agent)]);
            }
            out.push(Assignment {
                uid,
                namespace: job.namespace().unwrap_or_default(),
                name: job.name_any(),
                spec: encode_spec(&spec),
                acknowledged_sequence: acknowledged,
            });
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(out)
    }

    /// The job's spec with its script bodies: fetched once (then kept while it is
    /// asked for), and only if it still is the job that was checked and its bodies
    /// match their hashes. `None` when the job is gone or does not check out — which
    /// is remembered too, so a job that does not check out is not fetched again.
    async fn full_spec(
        &self,
        identity: &Identity,
        cached: &PatchJob,
        uid: &str,
    ) -> Result<Option<Arc<PatchJobSpec>>, Refusal> {
        if has_bodies(&cached.spec) {
            return Ok(Some(Arc::new(cached.spec.clone())));
        }
        if let Some((spec, used)) = self.specs.lock().get_mut(uid) {
            *used = Instant::now();
            return Ok(spec.clone());
        }
        if !self.agent_reads.allow(&identity.agent) {
            return Err(Refusal::Throttled);
        }
        let api: Api<PatchJob> =
            Api::namespaced(self.client.clone(), &cached.namespace().unwrap_or_default());
        let Some(full) = api
            .get_opt(&cached.name_any())
            .await
            .map_err(|err| Refusal::internal("reading a PatchJob", err))?
        else {
            return Ok(None);
        };
        let same = full.uid().as_deref() == Some(uid) && self.signer.verify(&full);
        let verified = protocol::decode_spec(&encode_spec(&full.spec)).is_ok();
        if !same || !verified {
            tracing::warn!(job = %cached.name_any(), "a PatchJob changed or does not verify; not served");
            self.specs
                .lock()
                .insert(uid.to_string(), (None, Instant::now()));
            return Ok(None);
        }
        let spec = Arc::new(full.spec);
        self.specs
            .lock()
            .insert(uid.to_string(), (Some(spec.clone()), Instant::now()));
        Ok(Some(spec))
    }

    /// The job a report is about: from the cache, else (another replica handed it out,
    /// and this one's cache has not caught up) from the API server by the name the
    /// report carries — within the caller's read budget; 410 when it is gone.
    async fn reported_job(
        &self,
        identity: &Identity,
        uid: &str,
        report: &ProgressReport,
    ) -> Result<Arc<PatchJob>, Refusal> {
        if let Some(job) = self.job_signals.job_by_uid(uid, &self.caches.jobs) {
            return Ok(job);
        }
        let Some(named) = &report.job else {
            return Err(Refusal::NotFound(format!(
                "no job with uid {}",
                protocol::bounded(uid, 64)
            )));
        };
        if crate::api::agent::agent_name_problem(&named.namespace).is_some()
            || !crate::manifests::is_dns_subdomain(&named.name)
        {
            return Err(Refusal::Invalid(
                "job namespace or name is not valid".into(),
            ));
        }
        if !self.agent_reads.allow(&identity.agent) {
            return Err(Refusal::Throttled);
        }
        let api: Api<PatchJob> = Api::namespaced(self.client.clone(), &named.namespace);
        match api.get_opt(&named.name).await {
            Ok(Some(mut job)) if job.uid().as_deref() == Some(uid) => {
                strip_for_cache(&mut job);
                Ok(Arc::new(job))
            }
            Ok(_) => Err(Refusal::Gone(format!(
                "job {} no longer exists",
                named.name
            ))),
            Err(err) => Err(Refusal::internal("reading a PatchJob", err)),
        }
    }

    /// One progress report from the caller.
    pub(super) async fn report(
        &self,
        identity: &Identity,
        uid: &str,
        report: ProgressReport,
    ) -> Result<ProgressAck, Refusal> {
        let job = self.reported_job(identity, uid, &report).await?;
        let _span = job_span(&job).entered();
        self.check_serving(identity, &job)?;
        let stored = job.status.as_ref();
        let mut book = self.progress.lock();
        book.seed(uid, stored.and_then(|s| s.last_sequence).unwrap_or(0));
        let sequence = report.sequence;
        if !(1..=protocol::MAX_SEQUENCE).contains(&sequence) {
            return Err(Refusal::Invalid(
                protocol::ReportProblem::Sequence.to_string(),
            ));
        }
        // A retry of what was accepted: the same answer as before, nothing changes.
        if sequence <= book.accepted(uid) && !book.overtaken(uid) {
            return Ok(ProgressAck {
                acknowledged_sequence: book.written(uid),
            });
        }
        if book.finished(uid) || stored.is_some_and(|s| s.phase.is_finished()) {
            return Err(Refusal::Conflict(format!(
                "job {} is finished; its result can no longer change",
                job.name_any()
            )));
        }
        let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let status = protocol::accept_report(&job.spec, stored, created, report, Timestamp::now())
            .map_err(|why| Refusal::Invalid(why.to_string()))?;
        if book.report(uid, sequence, status) == Accepted::Duplicate {
            tracing::debug!(%uid, sequence, "duplicate progress report ignored");
        }
        Ok(ProgressAck {
            acknowledged_sequence: book.written(uid),
        })
    }

    /// Writes the progress that is due; run every few hundred milliseconds.
    pub async fn flush(&self) {
        use futures::StreamExt;
        let due = self.progress.lock().due(Instant::now());
        futures::stream::iter(due)
            .for_each_concurrent(self.config.write_concurrency, |(uid, sequence, status)| {
                self.write_status(uid, sequence, status)
            })
            .await;
    }

    /// Writes one job's status over the state it was checked against: the job as the
    /// cache has it, or as the last write left it. A conflict means the job changed
    /// meanwhile: it is read again, and the status dropped if the job has finished.
    async fn write_status(&self, uid: String, sequence: i64, status: PatchJobStatus) {
        let Some(job) = self.job_signals.job_by_uid(&uid, &self.caches.jobs) else {
            self.progress.lock().forget(&uid);
            return;
        };
        let span = job_span(&job);
        self.write_job_status(job, uid, sequence, status)
            .instrument(span)
            .await;
    }

    async fn write_job_status(
        &self,
        job: Arc<PatchJob>,
        uid: String,
        sequence: i64,
        status: PatchJobStatus,
    ) {
        let api: Api<PatchJob> =
            Api::namespaced(self.client.clone(), &job.namespace().unwrap_or_default());
        let name = job.name_any();
        let mut version = self
            .progress
            .lock()
            .version(&uid)
            .or_else(|| job.resource_version());
        for _attempt in 0..2 {
            let body = json!({
                "apiVersion": "fleetpatch.io/v1alpha1",
                "kind": "PatchJob",
                "metadata": {"name": name, "resourceVersion": version},
                "status": PatchJobStatus { observed_generation: job.metadata.generation, ..status.clone() },
            });
            match api
                .patch_status(
                    &name,
                    &PatchParams::apply(field_manager::CONTROLLER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(written) => {
                    self.status_writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut book = self.progress.lock();
                    book.mark_written(&uid, sequence, written.resource_version());
                    let before = book
                        .told(&uid)
                        .unwrap_or_else(|| Told::of(&job.status.clone().unwrap_or_default()));
                    book.set_told(&uid, Told::of(&status));
                    drop(book);
                    self.tell(&job, story::told_by(&before, &status, &job.spec.agent));
                    if status.phase.is_finished() {
                        self.specs.lock().remove(&uid);
                    }
                    return;
                }
                Err(err) if api_errors::is_not_found(&err) => {
                    self.progress.lock().forget(&uid);
                    return;
                }
                Err(err) if api_errors::is_conflict(&err) => match api.get_opt(&name).await {
                    Ok(Some(fresh)) if fresh.uid().as_deref() == Some(uid.as_str()) => {
                        if fresh.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
                            tracing::info!(job = %name, "the job finished meanwhile; a late report is dropped");
                            self.progress.lock().overtake(&uid);
                            return;
                        }
                        version = fresh.resource_version();
                    }
                    Ok(_) => {
                        self.progress.lock().forget(&uid);
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(job = %name, error = %err, "cannot read a job after a conflict; will retry");
                        break;
                    }
                },
                Err(err) => {
                    tracing::warn!(job = %name, error = %err, "status write failed; will retry");
                    break;
                }
            }
        }
        self.progress.lock().retry(&uid, sequence, status);
    }

    /// Queues Events on `job` (never waits: see `crate::events`).
    fn tell(&self, job: &PatchJob, events: Vec<story::StoryEvent>) {
        if events.is_empty() {
            return;
        }
        let mut regarding = job.object_ref(&());
        regarding.resource_version = None;
        let _span = job_span(job).entered();
        for told in events {
            tracing::info!(reason = told.reason, note = %told.note, "job event");
            self.events.send(
                regarding.clone(),
                kube::runtime::events::Event {
                    type_: told.type_,
                    reason: told.reason.into(),
                    note: Some(story::bounded_note(told.note)),
                    action: told.action,
                    secondary: None,
                },
            );
        }
    }

    /// Drops the bookkeeping of jobs that no longer exist (deleted after their TTL or
    /// with their plan).
    pub(super) fn prune_progress(&self) {
        let idle = self.progress.lock().idle();
        let gone: Vec<String> = idle
            .into_iter()
            .filter(|uid| {
                self.job_signals
                    .job_by_uid(uid, &self.caches.jobs)
                    .is_none()
            })
            .collect();
        let mut book = self.progress.lock();
        for uid in &gone {
            book.forget(uid);
        }
        drop(book);
        let mut specs = self.specs.lock();
        for uid in &gone {
            specs.remove(uid);
        }
    }
}
