//! One module per subcommand: argument structs and the wiring of library crates.
pub mod bench;
pub mod learner;
pub mod model;
pub mod sft;
pub mod verifier;
pub mod world;
