//! fleetpatch: a Kubernetes operator that patches fleets of machines and runs pre- and
//! post-patching actions around the patches.

pub mod api;
pub mod crdgen;
pub mod devserver;
pub mod manifests;
pub mod structural;
