//! Rollout actor. It pulls work items and policy weights from the learner, samples K responses
//! per prompt with the model crate's KV-cache sampler, has the verifier grade them and streams
//! each whole group back. The service itself lands with the training issue; until then this
//! crate is empty and the `prime actor` subcommand says so.
