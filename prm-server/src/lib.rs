//! Implicit process reward model serving and evaluation.
//!
//! - [`scorer`]: token-level process rewards, `β · (log π_prm − log π_ref)` per response token,
//!   with the learner's own formula and mask, batched on the device.
//! - [`steps`]: reasoning steps from text markers (token offsets from the tokenizer), step
//!   scores and their aggregation (min, sum, mean, last).
//! - [`probe`]: the step-level probe: on traces with a known wrong step, the ROC AUC of the
//!   step reward separating wrong steps from right ones.
//! - [`vote`]: Best-of-N ranking by PRM score, optionally combined with (weighted) majority
//!   voting over extracted answers; the tie rules are documented there.
//! - [`service`]: the `PrmServer` gRPC service (one compute thread batching waiting requests),
//!   health, shared token, status, Prometheus, and following a learner for new PRM weights.
pub mod error;
pub mod probe;
pub mod scorer;
pub mod service;
pub mod steps;
pub mod vote;

pub use error::{PrmError, Result};
pub use probe::{probe, ProbeReport, ProbeTrace};
pub use scorer::{Pair, Scorer};
pub use steps::{Aggregation, StepSplit};
pub use vote::Voting;
