//! The embedded default world: a small task that exercises the same code paths as a 7B run
//! and needs nothing from the network.
//!
//! - [`problem`]: seeded arithmetic word problems (6 templates, 2 to 5 operations by default, up to 12) with
//!   step-by-step solutions ending in `\boxed{answer}`; optionally supervised traces from a
//!   flawed teacher ([`FlawedTeacherConfig`]) and probe cases with a known error at a known
//!   step ([`probe_cases`]).
//! - [`rows`] and [`dataset`]: Eurus-2-RL-Data rows, written and read as jsonl or parquet.
//! - [`tokenizer`]: a byte-level BPE in Qwen2's style, trained on the world's text, with a
//!   ChatML chat template that `transformers.AutoTokenizer` loads.
//! - [`build_world`]: writes all of it for a [`WorldConfig`], deterministically and
//!   idempotently.
//! - [`standin`]: a full-size synthetic stand-in for Eurus-2-RL-Data (482K rows of math and
//!   code, the real prompts and lengths like the real set's), for rehearsing the paper's run.

pub mod config;
pub mod dataset;
mod error;
pub mod problem;
pub mod rows;
pub mod standin;
pub mod tokenizer;
mod world;

pub use config::{FlawedTeacherConfig, Split, SplitConfig, WorldConfig};
pub use dataset::{read_row_results, read_rows, write_rows, DataFormat, ParquetRowWriter};
pub use error::WorldError;
pub use problem::{
    solution_text, teacher_steps, Op, Problem, ProblemGenerator, Step, Template, STEP_SEPARATOR,
};
pub use rows::{
    ChatMessage, DataRow, ExtraInfo, RewardModel, CODE_SUFFIX, MATH_SUFFIX, SYSTEM_PROMPT,
};
pub use world::{
    build_world, generate_problems, probe_cases, ProbeCase, SplitFiles, TeacherStats, TokenStats,
    WorldFiles, WorldStats, GENERATOR_VERSION, MANIFEST_FILE,
};
