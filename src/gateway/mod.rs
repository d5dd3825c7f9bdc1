//! The agent gateway: the HTTPS JSON API under `/agent/v1` through which agents
//! register, send heartbeats, receive their jobs and report progress. Agents never get
//! write access to the Kubernetes API; the gateway writes for them, and only to their
//! own Agent and PatchJobs.

pub mod coalesce;
pub mod credentials;
pub mod protocol;
pub mod server;
