//! Which jobs the gateway hands out, and to whom. The job cache's index (jobs by agent
//! and by uid, so a long-poll or a report never scans the fleet's jobs) with one
//! wake-up per agent; and the rules a job must pass before its scripts reach a host:
//! signed by the controller (an HMAC over the spec that only the controller's key can
//! make, so a PatchJob written by anyone else is never served), for the calling agent,
//! from a namespace the agent accepts plans from, and — for a node agent — on its own
//! node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use parking_lot::Mutex;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::api::agent::{Agent, AgentMode};
use crate::api::patchjob::{PatchJob, PatchJobSpec};

/// Annotation on a PatchJob: the controller's signature over its namespace, name and spec.
pub const SIGNATURE_ANNOTATION: &str = "fleetpatch.io/signature";
/// Name of the Secret (in the controller's namespace) holding the signing key.
pub const SIGNING_KEY_SECRET: &str = "fleetpatch-job-signing-key";

/// Signs and checks PatchJobs with the controller's key.
#[derive(Clone)]
pub struct JobSigner {
    key: Vec<u8>,
}

impl JobSigner {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// What is signed: namespace, name and the spec with every script body replaced by
    /// nothing — the bodies are bound by their SHA-256, which stays, so a job can be
    /// checked from a cache that holds no script bodies.
    fn digest_input(namespace: &str, name: &str, spec: &PatchJobSpec) -> Vec<u8> {
        let mut spec = spec.clone();
        for action in spec
            .pre_actions
            .iter_mut()
            .chain(spec.post_actions.iter_mut())
        {
            for script in action
                .script
                .iter_mut()
                .chain(action.detection_script.iter_mut())
            {
                script.content.clear();
            }
        }
        serde_json::to_vec(&(namespace, name, &spec)).expect("a spec serializes")
    }

    pub fn sign(&self, namespace: &str, name: &str, spec: &PatchJobSpec) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(&Self::digest_input(namespace, name, spec));
        format!("v1.{}", hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `job` carries this key's signature over what it says now.
    pub fn verify(&self, job: &PatchJob) -> bool {
        let Some(signature) = job
            .annotations()
            .get(SIGNATURE_ANNOTATION)
            .and_then(|s| s.strip_prefix("v1."))
            .and_then(|s| hex::decode(s).ok())
        else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(&Self::digest_input(
            &job.namespace().unwrap_or_default(),
            &job.name_any(),
            &job.spec,
        ));
        mac.verify_slice(&signature).is_ok()
    }
}

/// Why a job is not served to an agent (403 when the agent asked for it by uid).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    #[error("job {0} belongs to another agent")]
    OtherAgent(String),
    #[error("job {0} was not made by the controller")]
    Unsigned(String),
    #[error("agent {agent} does not accept plans from namespace {namespace}")]
    Namespace { agent: String, namespace: String },
    #[error("job {0} is for another node")]
    OtherNode(String),
}

/// Whether `job` may be served to `agent` (an authenticated caller; `node` is its node
/// for node agents): the pure rules, on cached objects.
pub fn serving_problem(
    job: &PatchJob,
    agent: &Agent,
    node: Option<&str>,
    signer: &JobSigner,
    namespaces: &Store<Namespace>,
    controller_namespace: &str,
) -> Result<(), NotServed> {
    let name = job.name_any();
    if job.spec.agent != agent.name_any() {
        return Err(NotServed::OtherAgent(name));
    }
    if !signer.verify(job) {
        return Err(NotServed::Unsigned(name));
    }
    let namespace = job.namespace().unwrap_or_default();
    let labels: Option<BTreeMap<String, String>> = namespaces
        .get(&ObjectRef::new(&namespace))
        .map(|ns| ns.labels().clone());
    if !agent
        .spec
        .allowed_plans
        .admits(&namespace, labels.as_ref(), controller_namespace)
    {
        return Err(NotServed::Namespace {
            agent: agent.name_any(),
            namespace,
        });
    }
    // A node's job goes to that node's agent only: never to an external host, even one
    // that took the name of a node whose Agent was deleted.
    if (agent.spec.mode == AgentMode::Node || job.spec.node.is_some())
        && job.spec.node.as_deref() != node
    {
        return Err(NotServed::OtherNode(name));
    }
    Ok(())
}

/// The job cache's index for the gateway, and one wake-up per agent for its
/// long-polls. Fed by the job reflector after the cache has the change.
#[derive(Default)]
pub struct JobSignals {
    signals: Mutex<HashMap<String, Arc<Notify>>>,
    index: Mutex<JobIndex>,
}

#[derive(Default)]
struct JobIndex {
    by_agent: HashMap<String, HashSet<ObjectRef<PatchJob>>>,
    by_uid: HashMap<String, ObjectRef<PatchJob>>,
}

impl JobSignals {
    pub fn signal(&self, agent: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .entry(agent.to_string())
            .or_default()
            .clone()
    }

    /// Wakes `agent`'s waiting long-poll. Call it after the job cache has the change.
    pub fn notify(&self, agent: &str) {
        if let Some(signal) = self.signals.lock().get(agent) {
            signal.notify_waiters();
        }
    }

    /// Indexes a job the cache has just seen (created, changed or deleted) and wakes
    /// its agent. Deleted jobs leave the index when a lookup no longer finds them.
    /// A job without a signature (the cache keeps none of an unsigned job, see
    /// `project_job`) is served to nobody: it is left out of the index, and wakes no
    /// long-poll, whichever agent it names.
    pub fn observe(&self, job: &PatchJob) {
        let reference = ObjectRef::from_obj(job);
        if !job.annotations().contains_key(SIGNATURE_ANNOTATION) {
            let mut index = self.index.lock();
            if let Some(references) = index.by_agent.get_mut(&job.spec.agent) {
                references.remove(&reference);
            }
            if let Some(uid) = job.uid() {
                index.by_uid.remove(&uid);
            }
            return;
        }
        {
            let mut index = self.index.lock();
            if let Some(uid) = job.uid() {
                index.by_uid.insert(uid, reference.clone());
            }
            index
                .by_agent
                .entry(job.spec.agent.clone())
                .or_default()
                .insert(reference);
        }
        self.notify(&job.spec.agent);
    }

    /// The cached jobs of `agent`.
    pub fn jobs_of(&self, agent: &str, jobs: &Store<PatchJob>) -> Vec<Arc<PatchJob>> {
        let mut index = self.index.lock();
        let Some(references) = index.by_agent.get_mut(agent) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        references.retain(|reference| match jobs.get(reference) {
            Some(job) if job.spec.agent == agent => {
                found.push(job);
                true
            }
            _ => false,
        });
        found
    }

    /// Forgets jobs the cache no longer holds, and the wake-ups of agents without any.
    pub fn prune(&self, jobs: &Store<PatchJob>) {
        let mut index = self.index.lock();
        index.by_uid.retain(|uid, reference| {
            jobs.get(reference)
                .is_some_and(|j| j.uid().as_deref() == Some(uid.as_str()))
        });
        index.by_agent.retain(|_, references| {
            references.retain(|reference| jobs.get(reference).is_some());
            !references.is_empty()
        });
        drop(index);
        // A signal nobody waits on is held only by this map.
        self.signals
            .lock()
            .retain(|_, signal| Arc::strong_count(signal) > 1);
    }

    /// The cached job with this uid.
    pub fn job_by_uid(&self, uid: &str, jobs: &Store<PatchJob>) -> Option<Arc<PatchJob>> {
        let mut index = self.index.lock();
        let reference = index.by_uid.get(uid)?;
        match jobs.get(reference) {
            Some(job) if job.uid().as_deref() == Some(uid) => Some(job),
            _ => {
                index.by_uid.remove(uid);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OperatingSystem;
    use crate::api::agent::{AgentSpec, AllowedPlans};

    fn job(namespace: &str, agent: &str, node: Option<&str>) -> PatchJob {
        let mut job = PatchJob::new(
            "weekly-m1-web-1",
            PatchJobSpec {
                node: node.map(String::from),
                ..PatchJobSpec::bare(agent, "weekly", "m1")
            },
        );
        job.metadata.namespace = Some(namespace.into());
        job
    }

    fn agent(name: &str, mode: AgentMode, allowed: AllowedPlans) -> Agent {
        Agent::new(
            name,
            AgentSpec {
                mode,
                os: OperatingSystem::Linux,
                node_name: (mode == AgentMode::Node).then(|| name.to_string()),
                paused: false,
                allowed_plans: allowed,
            },
        )
    }

    fn signed(signer: &JobSigner, mut job: PatchJob) -> PatchJob {
        let signature = signer.sign(&job.namespace().unwrap(), &job.name_any(), &job.spec);
        job.annotations_mut()
            .insert(SIGNATURE_ANNOTATION.into(), signature);
        job
    }

    #[test]
    fn only_signed_jobs_for_the_agent_from_an_accepted_namespace_are_served() {
        let signer = JobSigner::new(b"controller key");
        let (namespaces, _) = kube::runtime::reflector::store::<Namespace>();
        let web = agent(
            "web-1",
            AgentMode::External,
            AllowedPlans::named(["team-a"]),
        );
        let serve = |job: &PatchJob, agent: &Agent, node: Option<&str>| {
            serving_problem(job, agent, node, &signer, &namespaces, "fleetpatch-system")
        };
        let good = signed(&signer, job("team-a", "web-1", None));
        assert_eq!(serve(&good, &web, None), Ok(()));
        // Forged: no signature, another key's, or the spec changed after signing.
        assert!(matches!(
            serve(&job("team-a", "web-1", None), &web, None),
            Err(NotServed::Unsigned(_))
        ));
        let forged = signed(&JobSigner::new(b"guess"), job("team-a", "web-1", None));
        assert!(matches!(
            serve(&forged, &web, None),
            Err(NotServed::Unsigned(_))
        ));
        let mut tampered = good.clone();
        tampered.spec.plan = "other".into();
        assert!(matches!(
            serve(&tampered, &web, None),
            Err(NotServed::Unsigned(_))
        ));
        // Another agent's job, a namespace the agent does not accept.
        let other = agent("web-2", AgentMode::External, AllowedPlans::all());
        assert!(matches!(
            serve(&good, &other, None),
            Err(NotServed::OtherAgent(_))
        ));
        let team_b = signed(&signer, job("team-b", "web-1", None));
        assert!(matches!(
            serve(&team_b, &web, None),
            Err(NotServed::Namespace { .. })
        ));
        // By default only the controller's namespace.
        let default = agent("web-1", AgentMode::External, AllowedPlans::default());
        assert!(matches!(
            serve(&good, &default, None),
            Err(NotServed::Namespace { .. })
        ));
        let system = signed(&signer, job("fleetpatch-system", "web-1", None));
        assert_eq!(serve(&system, &default, None), Ok(()));
        // A node agent gets only jobs for its own node.
        let node = agent("node-a", AgentMode::Node, AllowedPlans::all());
        let unset = signed(&signer, job("team-a", "node-a", None));
        assert!(matches!(
            serve(&unset, &node, Some("node-a")),
            Err(NotServed::OtherNode(_))
        ));
        let elsewhere = signed(&signer, job("team-a", "node-a", Some("node-b")));
        assert!(matches!(
            serve(&elsewhere, &node, Some("node-a")),
            Err(NotServed::OtherNode(_))
        ));
        let own = signed(&signer, job("team-a", "node-a", Some("node-a")));
        assert_eq!(serve(&own, &node, Some("node-a")), Ok(()));
    }

    #[test]
    fn the_signature_does_not_depend_on_script_bodies_but_on_their_hashes() {
        let spec = crate::api::resolve::linux_default_spec();
        let signer = JobSigner::new(b"k");
        let mut job = PatchJob::new("j", spec);
        job.metadata.namespace = Some("x".into());
        let job = signed(&signer, job);
        let mut stripped = job.clone();
        for action in stripped.spec.post_actions.iter_mut() {
            if let Some(script) = &mut action.script {
                script.content.clear();
            }
        }
        assert!(
            signer.verify(&stripped),
            "a cache without bodies can check it"
        );
        let mut rehashed = job.clone();
        rehashed.spec.post_actions[0]
            .script
            .as_mut()
            .unwrap()
            .sha256 = "0".repeat(64);
        assert!(!signer.verify(&rehashed), "the hashes are signed");
    }

    /// Attack (a bootstrap-token holder): node `node-a` leaves the cluster (scaled down,
    /// or its Node object replaced) while signed jobs for it are still unfinished; its
    /// node Agent goes with it. A host with any bootstrap token then registers under the
    /// free name `node-a` — the gateway refuses only names of Nodes that exist — and is
    /// served the node's jobs: their scripts (and parameters) reach an external host the
    /// plan never selected, and its reports decide the node job's result. A job bound to
    /// a node (`spec.node`) is for that node's node agent only.
    #[test]
    fn a_node_job_is_never_served_to_an_external_agent_of_the_same_name() {
        let signer = JobSigner::new(b"controller key");
        let (namespaces, _) = kube::runtime::reflector::store::<Namespace>();
        let impostor = agent("node-a", AgentMode::External, AllowedPlans::all());
        let node_job = signed(&signer, job("team-a", "node-a", Some("node-a")));
        assert!(
            matches!(
                serving_problem(
                    &node_job,
                    &impostor,
                    None,
                    &signer,
                    &namespaces,
                    "fleetpatch-system"
                ),
                Err(NotServed::OtherNode(_))
            ),
            "a job for node node-a is served to an external host that took the name"
        );
    }
}
