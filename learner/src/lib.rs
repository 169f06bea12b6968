//! The PRIME learner: the algorithm core ([`algo`]), one iteration on scored groups
//! ([`step`]), AdamW with its schedules, the supervised warm-up, plots and the run config.
pub mod algo;
pub mod broadcast;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod service;
pub mod sft;
pub mod step;
pub mod trainer;

pub use config::{LearnerConfig, ModelSource, OptimizerConfig, RunConfig, SftConfig};
pub use error::{LearnerError, Result};
pub use optim::{lr_at, AdamW, AdamWConfig};
pub use step::{prime_step, PrimeModels, ScoredGroup, ScoredResponse, StepMetrics};
