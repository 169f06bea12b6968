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
pub mod batch;
pub mod broadcast;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod models;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod publish;
pub mod ranks;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod service;
pub mod sft;
pub mod step;
pub mod trainer;

pub use batch::{ScoredGroup, ScoredResponse};
pub use config::{LearnerConfig, ModelSource, OptimizerConfig, RunConfig, SftConfig};
pub use error::{LearnerError, Result};
pub use models::PrimeModels;
pub use optim::{lr_at, AdamW, AdamWConfig};
pub use step::{prime_step, StepMetrics};
