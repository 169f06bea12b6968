//! The models and optimizers one PRIME iteration updates.
use prime_model::CausalLm;
use tch::Tensor;

use crate::config::LearnerConfig;
use crate::optim::AdamW;

/// The models and optimizers a step updates.
#[derive(Debug)]
pub struct PrimeModels {
    /// π_θ, the trained policy.
    pub policy: CausalLm,
    /// π_φ, the implicit PRM.
    pub prm: CausalLm,
    /// π_ref, frozen; `None` when the reference is the old policy.
    pub reference: Option<CausalLm>,
    /// AdamW over the policy's parameters.
    pub policy_optimizer: AdamW,
    /// AdamW over the PRM's parameters.
    pub prm_optimizer: AdamW,
}

impl PrimeModels {
    /// Builds both optimizers over every trainable parameter. Their state is allocated at
    /// each parameter's first update (or sharded first, by `DataParallel::attach`), so
    /// building them takes no device memory.
    pub fn new(
        policy: CausalLm,
        prm: CausalLm,
        reference: Option<CausalLm>,
        config: &LearnerConfig,
    ) -> Self {
        let optimizer = if config.memory.master_weights {
            AdamW::with_master_weights
        } else {
            AdamW::new
        };
        let policy_optimizer =
            optimizer(trainable_parameters(&policy), config.policy_optimizer.adamw);
        let prm_optimizer = optimizer(trainable_parameters(&prm), config.prm_optimizer.adamw);
        Self {
            policy,
            prm,
            reference,
            policy_optimizer,
            prm_optimizer,
        }
    }
}

/// The trainable variables of a model by name, sorted so optimizer state lines up on resume.
pub fn trainable_parameters(lm: &CausalLm) -> Vec<(String, Tensor)> {
    let mut params: Vec<(String, Tensor)> = lm
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}
