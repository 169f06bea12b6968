//! Grading of math answers and code solutions, and the Verifier gRPC service.
//!
//! - [`math`]: a pure-Rust math grader (answer extraction, normalisation, equivalence).
//! - [`code`]: a sandboxed Python runner with the spec's test formats and partial credit.
//! - [`service`]: the thin gRPC layer over [`grade::Grader`].

pub mod error;
pub mod code;
pub mod math;

pub use error::VerifierError;
