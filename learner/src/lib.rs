//! The PRIME learner. This stage holds what the supervised warm-up needs and the learner
//! shares: the run config, AdamW with its schedule, and plots.
pub mod algo;
pub mod config;
pub mod error;
pub mod optim;
pub mod plot;
pub mod sft;

pub use config::{ModelSource, RunConfig, SftConfig};
pub use error::{LearnerError, Result};
pub use optim::{lr_at, AdamW, AdamWConfig};
