//! I/O that the scheduler and the worker share: the signals that stop them, their settings from
//! flags and environment variables, and the sandbox processes that run the jq programs neither
//! may run on its own threads.
//!
//! This crate owns process-level mechanics only. It knows nothing of runs, tasks, queues or the
//! database; the vocabulary those use stays in `taskfleet-common`, which does no I/O.

pub mod jq_sandbox;
pub mod settings;
pub mod signals;
