//! AdamW with decoupled weight decay (Loshchilov & Hutter), the one optimizer of the project:
//! supervised warm-up, policy and PRM updates all use it. Unlike tch's C++ optimizer its state
//! (moments and step count) can be saved and restored, so a run resumes exactly.
//!
//! Parameters may be stored in bf16: the moments are f32 and the update is computed in f32,
//! then rounded once into the parameter. An update smaller than half a bf16 step of the
//! parameter (2^-8 relative) is then lost; [`AdamW::with_master_weights`] keeps an f32 master
//! copy that accumulates such updates, at 4 more bytes per parameter.
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

/// AdamW over named parameters, with f32 moments and optional f32 master weights.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    moments: Vec<Moments>,
    /// Per parameter: the f32 master copy the updates go to, when one is kept.
    masters: Vec<Option<Tensor>>,
    step: i64,
}

impl AdamW {
    /// Optimises `params` (shallow clones of the trainable variables), named for checkpoints.
    /// Each update is computed in f32 and written into the parameter in its own dtype.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let masters = params.iter().map(|_| None).collect();
        Self::build(params, config, masters)
    }

    /// Like [`AdamW::new`], but every parameter not stored in f32 gets an f32 master copy:
    /// updates accumulate there and the parameter receives its rounding after each step.
    /// The masters are the truth from then on (writes to the parameters are overwritten by
    /// the next step) and are part of [`AdamW::state`] as `<param>.master`.
    pub fn with_master_weights(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let masters = params
            .iter()
            .map(|(_, p)| (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float)))
            .collect();
        Self::build(params, config, masters)
    }

    fn build(
        params: Vec<(String, Tensor)>,
        config: AdamWConfig,
        masters: Vec<Option<Tensor>>,
    ) -> Self {
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
            masters,
            step: 0,
        }
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// The optimised parameters, named, in order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The hyperparameters.
    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Whether f32 master copies are kept (for parameters not stored in f32).
    pub fn keeps_master_weights(&self) -> bool {
        self.masters.iter().any(Option::is_some)
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
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        self.step_with_grads(lr, &grads);
    }

    /// One AdamW update with the given gradient of each parameter, in order (an undefined
    /// tensor skips its parameter): the sharded optimizer of data parallelism passes the
    /// reduced gradient of its shard, which no autograd pass wrote.
    pub fn step_with_grads(&mut self, lr: f64, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
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
        for ((((_, p), moments), master), grad) in self
            .params
            .iter_mut()
            .zip(&mut self.moments)
            .zip(&mut self.masters)
            .zip(grads)
        {
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
            match master {
                Some(master) => {
                    let decayed = &*master * (1.0 - lr * weight_decay) - update;
                    master.copy_(&decayed);
                    p.copy_(master);
                }
                None => {
                    let decayed = p.to_kind(Kind::Float) * (1.0 - lr * weight_decay) - update;
                    p.copy_(&decayed);
                }
            }
        }
    }

    /// The optimizer state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, and
    /// `<param>.master` for master weights) plus the step count, for checkpoints.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, i64) {
        let mut state = BTreeMap::new();
        for (((name, _), moments), master) in
            self.params.iter().zip(&self.moments).zip(&self.masters)
        {
            state.insert(format!("{name}.exp_avg"), moments.m.shallow_clone());
            state.insert(format!("{name}.exp_avg_sq"), moments.v.shallow_clone());
            if let Some(master) = master {
                state.insert(format!("{name}.master"), master.shallow_clone());
            }
        }
        (state, self.step)
    }

    /// Restores a state written by [`AdamW::state`]; every parameter's moments must be present
    /// with the right shape. A master copy absent from `state` (a run that had none) is taken
    /// from the parameter as it is now.
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
        for ((name, p), master) in self.params.iter().zip(&mut self.masters) {
            let Some(master) = master else { continue };
            let key = format!("{name}.master");
            match state.get(&key) {
                Some(src) if src.size() != p.size() => {
                    return Err(format!(
                        "{key}: shape {:?}, parameter has {:?}",
                        src.size(),
                        p.size()
                    ));
                }
                Some(src) => master.copy_(src),
                None => master.copy_(p),
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

    const NO_DECAY: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };

    /// `steps` updates of a bf16 parameter of four ones under the constant gradient 1.
    fn constant_gradient_steps(optimizer: &mut AdamW, param: &Tensor, steps: usize, lr: f64) {
        for _ in 0..steps {
            optimizer.zero_grad();
            param.sum(Kind::Float).backward();
            optimizer.step(lr);
        }
    }

    fn ones_bf16() -> Tensor {
        Tensor::ones([4], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
    }

    #[test]
    fn bf16_parameter_takes_the_f32_update_rounded_once() {
        tch::set_num_threads(1);
        // Step 1 has m_hat = g and v_hat = g^2: the update is lr * g / (|g| + eps).
        let init = [0.75f32, -0.3, 0.02, 1.5];
        let grad = [0.5f32, -2.0, 1e-3, 0.0];
        let (lr, decay) = (0.01, 0.1);
        let param = Tensor::from_slice(&init)
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true);
        let config = AdamWConfig {
            weight_decay: decay,
            ..NO_DECAY
        };
        let mut optimizer = AdamW::new(vec![("w".into(), param.shallow_clone())], config);
        (&param * Tensor::from_slice(&grad))
            .sum(Kind::Float)
            .backward();
        optimizer.step(lr);
        assert_eq!(param.kind(), Kind::BFloat16);
        assert_eq!(optimizer.state().0["w.exp_avg"].kind(), Kind::Float);
        assert_eq!(optimizer.state().0["w.exp_avg_sq"].kind(), Kind::Float);
        let start = values(&Tensor::from_slice(&init).to_kind(Kind::BFloat16));
        for ((got, p0), g) in values(&param).iter().zip(&start).zip(grad) {
            let g = g as f64;
            let expected = p0 * (1.0 - lr * decay) - lr * g / (g.abs() + 1e-8);
            // Rounded to the nearest bf16: within half a step (8 significant bits).
            let half_step = 2f64.powi(expected.abs().log2().floor() as i32 - 8);
            assert!(
                (got - expected).abs() <= half_step,
                "{got} vs {expected} (start {p0}, gradient {g})"
            );
        }
    }

    #[test]
    fn master_weights_keep_updates_below_bf16_resolution() {
        tch::set_num_threads(1);
        // Each step moves the parameter by lr = 1e-3 (constant gradient: m_hat / sqrt(v_hat)
        // = 1). Below 1.0 bf16 steps are 2^-8, so 1 - 1e-3 rounds back to 1 every time.
        let (steps, lr) = (100, 1e-3);
        let plain = ones_bf16();
        let mut without = AdamW::new(vec![("w".into(), plain.shallow_clone())], NO_DECAY);
        constant_gradient_steps(&mut without, &plain, steps, lr);
        assert_eq!(values(&plain), vec![1.0; 4]);

        // With an f32 master the hundred steps add up to 1 - 0.1 = 0.9, whose nearest bf16
        // is 230 / 256 = 0.8984375.
        let mastered = ones_bf16();
        let mut with =
            AdamW::with_master_weights(vec![("w".into(), mastered.shallow_clone())], NO_DECAY);
        constant_gradient_steps(&mut with, &mastered, steps, lr);
        assert_eq!(values(&mastered), vec![0.8984375; 4]);
        let (state, _) = with.state();
        assert_eq!(state["w.master"].kind(), Kind::Float);
        for master in values(&state["w.master"]) {
            assert!((master - 0.9).abs() < 1e-5, "master {master}");
        }
    }

    #[test]
    fn master_weights_resume_exactly_and_skip_f32_parameters() {
        tch::set_num_threads(1);
        let lr = 1e-3;
        let full = ones_bf16();
        let mut uninterrupted =
            AdamW::with_master_weights(vec![("w".into(), full.shallow_clone())], NO_DECAY);
        constant_gradient_steps(&mut uninterrupted, &full, 60, lr);

        let first_param = ones_bf16();
        let mut first =
            AdamW::with_master_weights(vec![("w".into(), first_param.shallow_clone())], NO_DECAY);
        constant_gradient_steps(&mut first, &first_param, 30, lr);
        let (state, step) = first.state();
        let saved: BTreeMap<String, Tensor> =
            state.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let resumed_param = first_param.detach().copy().set_requires_grad(true);
        let mut resumed =
            AdamW::with_master_weights(vec![("w".into(), resumed_param.shallow_clone())], NO_DECAY);
        resumed.load_state(&saved, step).unwrap();
        constant_gradient_steps(&mut resumed, &resumed_param, 30, lr);
        assert_eq!(values(&resumed_param), values(&full));
        assert_eq!(
            values(&resumed.state().0["w.master"]),
            values(&uninterrupted.state().0["w.master"])
        );

        // An f32 parameter needs no master copy.
        let f32_param = Tensor::ones([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let optimizer = AdamW::with_master_weights(vec![("w".into(), f32_param)], NO_DECAY);
        assert!(!optimizer.state().0.contains_key("w.master"));
    }
}
