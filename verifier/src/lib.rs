//! Grading of math answers and code solutions, and the Verifier gRPC service.
//!
//! - [`math`]: a pure-Rust math grader (answer extraction, normalisation, equivalence).
//! - [`code`]: a sandboxed Python runner with the spec's test formats and partial credit.
//! - [`grade`]: dispatch by ability, bounded concurrency, per-item time limit, metrics.
//! - [`service`]: the thin gRPC layer over [`grade::Grader`] and the server wiring.
//! - [`jsonl`]: the `prime grade` file tool, local or through a running verifier.
//! - [`bench`]: `prime bench verifier` (math against math-verify, sandbox against bare python).

pub mod bench;
pub mod code;
pub mod error;
pub mod grade;
pub mod jsonl;
pub mod math;
pub mod metrics;
pub mod service;

pub use error::VerifierError;
pub use grade::{Ability, GradeItem, GradeResult, Grader, GraderConfig, Outcome};
