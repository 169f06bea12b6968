//! Benchmarks against the tools users would otherwise pick, side by side in one run: our
//! model layer against Hugging Face transformers (generation, scoring), our learner step
//! against the same step in plain PyTorch ([`learner_step`]), the weight stream against a
//! raw TCP copy ([`weight_sync`]), and the weight broadcast to N actors against N concurrent
//! weight streams ([`weight_broadcast`]).
//!
//! For each batch size we time our implementation in this process (one warm-up run excluded,
//! median of the repeats), then run `bench/python/bench_transformers.py` with the same model,
//! batch, lengths, device, dtype and thread count as a subprocess and read its JSON line.
//! Speed is only ever measured here and reported in docs/benchmarks.md; tests never assert it.
//! [`allreduce`] measures the data-parallel learner's CPU collective backend, [`train`] the
//! end-to-end demo (`prime train`) with several actor counts. [`data_prep`] times preparing
//! the full-size Eurus-2-RL-Data stand-in against transformers' `apply_chat_template`.
pub mod allreduce;
pub mod data_prep;
pub mod error;
pub mod learner_step;
pub mod load;
pub mod machine;
pub mod ours;
pub mod python;
pub mod report;
pub mod sharding;
pub mod train;
pub mod weight_broadcast;
pub mod weight_sync;

pub use error::{BenchError, Result};
pub use machine::Machine;
pub use ours::{Measurement, Task};
pub use python::{Python, TinyModel};
pub use report::{run, BenchSettings, Report, Row};
