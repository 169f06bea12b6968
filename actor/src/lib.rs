//! Rollout actor. It registers with the learner, pulls work items, fetches (and verifies) the
//! policy weights whenever the policy version changes, samples K responses per prompt with
//! the model crate's KV-cache sampler, has the verifier grade them and streams each whole
//! group back to the learner with its policy version.
//!
//! - [`run_actor`] is the loop (see [`run`] for the threads and the session rules).
//! - [`rollout`] holds the pure steps of one batch, [`broadcast`] the follower of the
//!   learner's weight broadcast, [`telemetry`] the metrics and probes of the metrics port and
//!   [`backoff`] the pauses between retries. The gRPC
//!   plumbing is [`prime_proto::client`], the receiving end of a weight transfer
//!   [`prime_model::transfer`].
pub mod backoff;
pub mod broadcast;
pub mod config;
pub mod error;
pub mod rollout;
pub mod run;
pub mod telemetry;

pub use config::{ActorConfig, MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES};
pub use error::{ActorError, Result};
pub use run::{run_actor, ActorStats, BatchTimes};
