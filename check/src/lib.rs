//! Validation at the edge of every command, in one place so a value is refused the same way,
//! with the same words, wherever it enters: a config file, a `--set` override, a flag or an
//! environment variable.
//!
//! - [`number`]: ranges of numbers ([`Range`], the named [`rules`] of the project's knobs) and
//!   the clap value parsers built from them ([`arg`]), so a flag and its config key share one
//!   rule.
//! - [`path`]: an output that is not the input ([`path::distinct`]), outputs that replace a
//!   file or directory only once complete ([`path::AtomicFile`], [`path::StagedDir`]).
//! - [`jsonl`]: JSONL input read with errors that name the file and line (a byte-order mark and
//!   CRLF line ends are accepted).
//! - [`panics`]: a panic turned into an error at an edge ([`panics::catch`]), and the binary's
//!   hook that prints any other panic as one line and exits with [`panics::INTERNAL_ERROR`].
pub mod jsonl;
pub mod number;
pub mod panics;
pub mod path;

pub use number::{arg, rules, Invalid, Range};
pub use path::FileError;
