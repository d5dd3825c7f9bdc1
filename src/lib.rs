//! fleetpatch: a Kubernetes operator that patches fleets of machines and runs pre- and
//! post-patching actions around the patches.
//!
//! Every build has the API types, the manifests checks and the agent. The `full`
//! feature (the default) adds the controller, the gateway, the dev server and the
//! Kubernetes client they use; without it the crate is the agent alone.

pub mod agent;
pub mod api;
#[cfg(feature = "full")]
pub mod api_errors;
#[cfg(feature = "full")]
pub mod controller;
#[cfg(feature = "full")]
pub mod crdgen;
#[cfg(feature = "full")]
pub mod devserver;
#[cfg(feature = "full")]
pub mod duplicate;
#[cfg(feature = "full")]
pub mod events;
#[cfg(feature = "full")]
pub mod field_manager;
#[cfg(feature = "full")]
pub mod gateway;
pub mod logs;
pub mod manifests;
pub mod shutdown;
pub mod structural;
pub mod tls;

/// The agent build keeps of the gateway only the wire protocol the agent speaks.
#[cfg(not(feature = "full"))]
pub mod gateway {
    pub mod protocol;
}
