//! One module per subcommand: argument structs and the wiring of library crates.
pub mod actor;
pub mod bench;
pub mod compare;
pub mod data;
pub mod eval;
pub mod learner;
pub mod model;
pub mod model_init;
pub mod plan;
pub mod prm;
pub mod prm_server;
pub mod sft;
pub mod status;
pub mod tls;
pub mod train;
pub mod verifier;
pub mod world;
