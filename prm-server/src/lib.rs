//! Implicit process reward model serving: token-level process rewards (beta times the per-token
//! log-ratio of PRM to reference) and Best-of-N ranking. The service lands with the prm-server
//! issue; until then this crate is empty and the `prime prm-server` subcommand says so.
