//! AdamW with decoupled weight decay (Loshchilov & Hutter), the one optimizer of the project:
//! supervised warm-up, policy and PRM updates all use it. Unlike tch's C++ optimizer its state
//! (moments and step count) can be saved and restored, so a run resumes exactly.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Exponential decay of the first moment.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Exponential decay of the second moment.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Added to the root of the second moment.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr * weight_decay * p`.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.01
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
        }
    }
}

/// Moments of one parameter.
#[derive(Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters, with f32 moments.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    moments: Vec<Moments>,
    step: i64,
}

impl AdamW {
    /// Optimises `params` (shallow clones of the trainable variables), named for checkpoints.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let moments = params
            .iter()
            .map(|(_, p)| Moments {
                m: p.zeros_like().to_kind(Kind::Float),
                v: p.zeros_like().to_kind(Kind::Float),
            })
            .collect();
        Self {
            config,
            params,
            moments,
            step: 0,
        }
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Clears the gradients of every parameter.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm` (no-op when
    /// `max_norm <= 0`). Returns the norm before clipping, for logging.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            .collect();
        let norm = Tensor::stack(&squares, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[]);
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        }
        norm
    }

    /// One AdamW update with learning rate `lr`; parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2 = 1.0 - beta2.powi(self.step as i32);
        for ((_, p), moments) in self.params.iter_mut().zip(&mut self.moments) {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(Kind::Float);
            // m <- b1 m + (1 - b1) g ; v <- b2 v + (1 - b2) g^2
            let _ = moments
                .m
                .g_mul_scalar_(beta1)
                .g_add_(&(&grad * (1.0 - beta1)));
            let _ = moments
                .v
                .g_mul_scalar_(beta2)
                .g_add_(&(grad.square() * (1.0 - beta2)));
            // p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
            let denom = (&moments.v / bias2).sqrt() + eps;
            let update = (&moments.m / bias1) / denom * lr;
            let decayed = p.to_kind(Kind::Float) * (1.0 - lr * weight_decay) - update;
            p.copy_(&decayed);
        }
    }

    /// The optimizer state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) plus
    /// the step count, for checkpoints.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, i64) {
        let mut state = BTreeMap::new();
        for ((name, _), moments) in self.params.iter().zip(&self.moments) {
            state.insert(format!("{name}.exp_avg"), moments.m.shallow_clone());
            state.insert(format!("{name}.exp_avg_sq"), moments.v.shallow_clone());
        }
        (state, self.step)
    }

    /// Restores a state written by [`AdamW::state`]; every parameter's moments must be present
    /// with the right shape.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        for ((name, p), moments) in self.params.iter().zip(&mut self.moments) {
            for (suffix, dst) in [("exp_avg", &mut moments.m), ("exp_avg_sq", &mut moments.v)] {
                let key = format!("{name}.{suffix}");
                let src = state
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state lacks {key}"))?;
                if src.size() != p.size() {
                    return Err(format!(
                        "{key}: shape {:?}, parameter has {:?}",
                        src.size(),
                        p.size()
                    ));
                }
                dst.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Learning rate at `step` (0-based): linear warm-up over `warmup_steps`, then cosine decay
/// from `peak` to `peak * min_ratio` at `total_steps`, constant after.
pub fn lr_at(step: u64, peak: f64, warmup_steps: u64, total_steps: u64, min_ratio: f64) -> f64 {
    if step < warmup_steps {
        return peak * (step + 1) as f64 / warmup_steps as f64;
    }
    let span = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = ((step - warmup_steps) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert!((lr_at(0, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 10, 110, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 10, 110, 0.1) - 1.0).abs() < 1e-12);
        // Halfway through the decay: min + (1 - min) / 2.
        assert!((lr_at(60, 1.0, 10, 110, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 1.0, 10, 110, 0.1) - 0.1).abs() < 1e-12);
    }
}
