//! fleetpatch: a Kubernetes operator that patches fleets of machines and runs pre- and
//! post-patching actions around the patches.

pub mod agent;
pub mod api;
pub mod api_errors;
pub mod controller;
pub mod crdgen;
pub mod devserver;
pub mod duplicate;
pub mod events;
pub mod field_manager;
pub mod gateway;
pub mod logs;
pub mod manifests;
pub mod shutdown;
pub mod structural;
pub mod tls;
