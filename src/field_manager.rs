//! The field managers fleetpatch writes under (server-side apply and creates), one per
//! writer, so `managedFields` say who owns what.

/// The controller's reconcilers, and the gateway's job status writes on its behalf.
pub const CONTROLLER: &str = "fleetpatch.io/controller";
/// The gateway's writes of Agents, credentials and presence Leases.
pub const GATEWAY: &str = "fleetpatch.io/gateway";
