//! The PRIME learner. Modules are listed from the bottom up: each one imports only modules
//! listed before it (a test holds every `use crate::` line to this order), so the crate reads
//! in one direction, from plain data to the running service.
//!
//! - foundations: [`error`], [`optim`] (AdamW and its schedule), [`config`] (the run config,
//!   one sub-config per TOML table), [`plot`];
//! - one iteration: [`batch`] (scored groups and their tensor layout), [`models`] (policy, PRM,
//!   reference and their optimizers), [`checkpoint`], [`parallel`] (the data-parallel group,
//!   ZeRO sharding, the rank protocol), [`step`] (`prime_step`);
//! - the loop around it: [`scheduler`] (work, groups, filter, leases), [`eval`] (the one
//!   sample-and-grade loop: evaluation and local rollouts), [`sft`] (supervised warm-up),
//!   [`trainer`] (steps, evaluation, metrics, checkpoints), [`report`], [`run`] (opening a
//!   run, the single-process loop);
//! - serving: [`publish`] (published weights), [`broadcast`] (the weight broadcast),
//!   [`service`] (the Learner gRPC service and its compute loop), [`ranks`] (one learner
//!   process: its rank, its group, rank 0 or a follower).
pub mod error;
pub mod optim;
pub mod config;
pub mod plot;
pub mod batch;
pub mod models;
pub mod checkpoint;
pub mod parallel;
pub mod step;
pub mod scheduler;
pub mod eval;
pub mod sft;
pub mod trainer;
pub mod report;
pub mod run;
pub mod publish;
pub mod broadcast;
pub mod service;
pub mod ranks;

pub use batch::{ScoredGroup, ScoredResponse};
pub use config::{LearnerConfig, ModelSource, OptimizerConfig, RunConfig, SftConfig};
pub use error::{LearnerError, Result};
pub use models::PrimeModels;
pub use optim::{lr_at, AdamW, AdamWConfig};
pub use step::{prime_step, StepMetrics};
