//! The agent: runs PatchJobs on a host. The executor walks a job's pre actions,
//! patches, post actions and single reboot with the seeds' semantics, journaling every
//! step so a crash or a reboot resumes where it stopped.

pub mod containment;
pub mod download;
pub mod executor;
pub mod journal;
pub mod local;
pub mod outcome;
pub mod patcher;
pub mod powershell;
pub mod process;
pub mod reboot;
pub mod remote;
pub mod script;
