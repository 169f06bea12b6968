//! One module per subcommand: argument structs and the wiring of library crates.
pub mod model;
