//! The PRIME learner. Modules are listed from the bottom up: each one imports only modules
//! listed before it (a test holds every `use crate::` line to this order), so the crate reads
//! in one direction, from plain data to the running service.
//!
//! - foundations: [`error`], [`optim`] (AdamW and its schedule), [`config`] (the run config,
//!   one sub-config per TOML table), [`plot`], [`tensorboard`];
//! - one iteration: [`batch`] (scored groups and their tensor layout), [`models`] (policy, PRM,
//!   reference and their optimizers), [`checkpoint`], [`parallel`] (the data-parallel group,
//!   ZeRO sharding, the rank protocol), [`step`] (`prime_step`);
//! - the loop around it: [`scheduler`] (work, groups, filter, leases), [`data`] (rows read,
//!   validated, routed by ability, tokenized on all cores, summarised), [`eval`] (the one
//!   sample-and-grade loop: evaluation and local rollouts), [`plan`] (what each role holds on
//!   a GPU: `prime plan` and the start-time check), [`sft`] (supervised warm-up),
//!   [`trainer`] (steps, evaluation, metrics, checkpoints), [`report`], [`run`] (opening a
//!   run, the single-process loop);
//! - serving (published weights are `prime_model::transfer::Published`): [`broadcast`] (the weight broadcast),
//!   [`service`] (the Learner gRPC service and its compute loop), [`ranks`] (one learner
//!   process: its rank, its group, rank 0 or a follower).
/// The crate's one error type.
pub mod error;

/// AdamW and its schedules.
pub mod optim;

/// The run config: one sub-config per TOML table.
pub mod config;

/// PNG line charts.
pub mod plot;

/// The namespaced keys of `metrics.jsonl` and the TensorBoard scalars.
pub mod record_keys;

/// TensorBoard scalar event files, written live.
pub mod tensorboard;

/// Scored groups and their tensor layout.
pub mod batch;

/// Policy, PRM, reference and their optimizers.
pub mod models;

/// Atomic, exact checkpoints.
pub mod checkpoint;

/// The data-parallel group, ZeRO sharding, the rank protocol.
pub mod parallel;

/// One PRIME iteration.
pub mod step;

/// Work hand-out, group collection, filter, leases.
pub mod scheduler;

/// Data preparation: rows validated, routed by ability, tokenized, length-filtered, counted.
pub mod data;

/// The one sample-and-grade loop: evaluation and local rollouts.
pub mod eval;

/// The memory plan of a run: what each role holds on a GPU, and whether it fits.
pub mod plan;

/// The supervised warm-up.
pub mod sft;

/// The loop around the step.
pub mod trainer;

/// Plots and `summary.json`.
pub mod report;

/// Opening a run; the single-process loop.
pub mod run;

/// The weight broadcast.
pub mod broadcast;

/// The Learner gRPC service and its compute loop.
pub mod service;

/// One learner process: its rank, rank 0 or a follower.
pub mod ranks;

pub use batch::{ScoredGroup, ScoredResponse};
pub use config::{LearnerConfig, ModelSource, OptimizerConfig, RunConfig, SftConfig};
pub use error::{LearnerError, Result};
pub use models::PrimeModels;
pub use optim::{lr_at, AdamW, AdamWConfig};
pub use step::{prime_step, StepMetrics};
