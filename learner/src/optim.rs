//! AdamW with decoupled weight decay (Loshchilov & Hutter), the one optimizer of the project:
//! supervised warm-up, policy and PRM updates all use it. Unlike tch's C++ optimizer its state
//! (moments and step count) can be saved and restored, so a run resumes exactly.
//!
//! Parameters may be stored in bf16: the moments are f32 and the update is computed in f32,
//! then rounded once into the parameter. An update smaller than half a bf16 step of the
//! parameter (2^-8 relative) is then lost; [`AdamW::with_master_weights`] keeps an f32 master
//! copy that accumulates such updates, at 4 more bytes per parameter.
//!
//! The state is allocated lazily: a parameter's moments (and master copy) come into being
//! on its device at its first update. Until then they are zeros (and the parameter itself),
//! which [`AdamW::state`] produces on the host. A loaded state can be kept on the host
//! ([`AdamW::stage_state`]) until the first update moves it: the data-parallel learner
//! shards it from there, so no rank ever holds a whole model's optimizer state on its GPU.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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

impl AdamWConfig {
    /// Moments in [0, 1), ε above 0 and a weight decay of 0 or more, all finite; keys named
    /// under `prefix`.
    pub fn validate(&self, prefix: &str) -> std::result::Result<(), String> {
        use prime_check::rules;
        rules::ADAM_MOMENT.check(&format!("{prefix}.beta1"), self.beta1)?;
        rules::ADAM_MOMENT.check(&format!("{prefix}.beta2"), self.beta2)?;
        rules::ADAM_EPS.check(&format!("{prefix}.eps"), self.eps)?;
        rules::COEFFICIENT.check(&format!("{prefix}.weight_decay"), self.weight_decay)?;
        Ok(())
    }
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

/// One piece of a parameter's optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePart {
    /// The first moment (`<param>.exp_avg`).
    ExpAvg,
    /// The second moment (`<param>.exp_avg_sq`).
    ExpAvgSq,
    /// The f32 master copy (`<param>.master`).
    Master,
}

impl StatePart {
    /// The suffix of the piece's name in [`AdamW::state`].
    pub fn suffix(self) -> &'static str {
        match self {
            Self::ExpAvg => "exp_avg",
            Self::ExpAvgSq => "exp_avg_sq",
            Self::Master => "master",
        }
    }
}

/// Where one piece of a parameter's state is.
#[derive(Debug)]
enum Slot {
    /// Never allocated: zeros for a moment, the parameter itself for a master copy.
    Fresh,
    /// Loaded and kept where it was read (the host); moved to the parameter's device by the
    /// first update that needs it.
    Staged(Tensor),
    /// On the parameter's device (f32), updated in place.
    Live(Tensor),
}

impl Slot {
    /// The tensor of the piece, unless it was never allocated.
    fn held(&self) -> Option<&Tensor> {
        match self {
            Self::Fresh => None,
            Self::Staged(t) | Self::Live(t) => Some(t),
        }
    }

    /// The piece on `device`, allocated there now if it was not: `fresh` makes a never
    /// allocated one, a staged one is copied over (and the host copy dropped).
    fn live(&mut self, device: Device, fresh: impl FnOnce() -> Tensor) -> &mut Tensor {
        let tensor = match std::mem::replace(self, Self::Fresh) {
            Self::Live(t) => t,
            Self::Staged(t) => {
                let mut live = Tensor::empty(t.size(), (Kind::Float, device));
                live.copy_(&t);
                live
            }
            Self::Fresh => fresh(),
        };
        *self = Self::Live(tensor);
        match self {
            Self::Live(t) => t,
            _ => unreachable!("just set"),
        }
    }

    /// Elements held on the parameter's device.
    fn live_elements(&self) -> usize {
        match self {
            Self::Live(t) => t.numel(),
            _ => 0,
        }
    }

    /// Elements held on the host, waiting for the first update.
    fn staged_elements(&self) -> usize {
        match self {
            Self::Staged(t) => t.numel(),
            _ => 0,
        }
    }
}

/// The state of one parameter.
#[derive(Debug)]
struct ParamState {
    m: Slot,
    v: Slot,
    /// `None` when no master copy is kept for the parameter.
    master: Option<Slot>,
}

impl ParamState {
    fn slot(&self, part: StatePart) -> Option<&Slot> {
        match part {
            StatePart::ExpAvg => Some(&self.m),
            StatePart::ExpAvgSq => Some(&self.v),
            StatePart::Master => self.master.as_ref(),
        }
    }

    fn slot_mut(&mut self, part: StatePart) -> Option<&mut Slot> {
        match part {
            StatePart::ExpAvg => Some(&mut self.m),
            StatePart::ExpAvgSq => Some(&mut self.v),
            StatePart::Master => self.master.as_mut(),
        }
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        [Some(&self.m), Some(&self.v), self.master.as_ref()]
            .into_iter()
            .flatten()
    }
}

/// Per piece of one parameter's state, the tensor a load takes (`None`: a master absent).
type Sources<'a> = Vec<(StatePart, Option<&'a Tensor>)>;

/// Zeros of `p`'s shape in f32 on `device`: a moment never allocated.
fn zeros_for(p: &Tensor, device: Device) -> Tensor {
    Tensor::zeros(p.size(), (Kind::Float, device))
}

/// AdamW over named parameters, with f32 moments and optional f32 master weights, allocated
/// at each parameter's first update.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    states: Vec<ParamState>,
    step: i64,
}

impl AdamW {
    /// Optimises `params` (shallow clones of the trainable variables), named for checkpoints.
    /// Each update is computed in f32 and written into the parameter in its own dtype.
    /// Allocates no state until the first update.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self::build(params, config, false)
    }

    /// Like [`AdamW::new`], but every parameter not stored in f32 gets an f32 master copy:
    /// updates accumulate there and the parameter receives its rounding after each step.
    /// A master is taken from its parameter at the parameter's first update (or loaded);
    /// from then on it is the truth (writes to the parameter are overwritten by the next
    /// step). Masters are part of [`AdamW::state`] as `<param>.master`.
    pub fn with_master_weights(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self::build(params, config, true)
    }

    fn build(params: Vec<(String, Tensor)>, config: AdamWConfig, masters: bool) -> Self {
        let states = params
            .iter()
            .map(|(_, p)| ParamState {
                m: Slot::Fresh,
                v: Slot::Fresh,
                master: (masters && p.kind() != Kind::Float).then_some(Slot::Fresh),
            })
            .collect();
        Self {
            config,
            params,
            states,
            step: 0,
        }
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> i64 {
        self.step
    }

    /// Sets the number of updates taken (the bias correction of the next step follows it).
    pub fn set_step_count(&mut self, step: i64) {
        self.step = step;
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
        self.states.iter().any(|s| s.master.is_some())
    }

    /// Whether parameter `index` has an f32 master copy.
    pub fn keeps_master(&self, index: usize) -> bool {
        self.states[index].master.is_some()
    }

    /// The piece `part` of parameter `index`'s state as held (on the device, or on the host
    /// when staged); `None` when it was never allocated (zeros for a moment, the parameter
    /// for a master) or the parameter keeps no master.
    pub fn held(&self, index: usize, part: StatePart) -> Option<Tensor> {
        self.states[index]
            .slot(part)
            .and_then(Slot::held)
            .map(Tensor::shallow_clone)
    }

    /// Puts `tensor` (f32, the parameter's shape, on its device; not copied) in place as the
    /// piece `part` of parameter `index`'s state. Ignored for a master the parameter does
    /// not keep.
    pub fn put(&mut self, index: usize, part: StatePart, tensor: Tensor) {
        if let Some(slot) = self.states[index].slot_mut(part) {
            *slot = Slot::Live(tensor);
        }
    }

    /// Forgets the piece `part` of parameter `index`'s state: zeros again (the parameter, for
    /// a master), allocated at the next update.
    pub fn clear(&mut self, index: usize, part: StatePart) {
        if let Some(slot) = self.states[index].slot_mut(part) {
            *slot = Slot::Fresh;
        }
    }

    /// Elements of state (moments and masters) allocated on the parameters' devices.
    pub fn allocated_state_elements(&self) -> usize {
        self.states
            .iter()
            .flat_map(ParamState::slots)
            .map(Slot::live_elements)
            .sum()
    }

    /// Elements of state loaded and kept on the host until the first update
    /// ([`AdamW::stage_state`]).
    pub fn staged_state_elements(&self) -> usize {
        self.states
            .iter()
            .flat_map(ParamState::slots)
            .map(Slot::staged_elements)
            .sum()
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
    /// reduced gradient of its shard, which no autograd pass wrote. A parameter's state is
    /// allocated on its device here, at its first update.
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
        for (((_, p), state), grad) in self.params.iter_mut().zip(&mut self.states).zip(grads) {
            if !grad.defined() {
                continue;
            }
            let device = p.device();
            let grad = grad.to_kind(Kind::Float);
            // m <- b1 m + (1 - b1) g ; v <- b2 v + (1 - b2) g^2
            let m = state.m.live(device, || zeros_for(p, device));
            let _ = m.g_mul_scalar_(beta1).g_add_(&(&grad * (1.0 - beta1)));
            let m = m.shallow_clone();
            let v = state.v.live(device, || zeros_for(p, device));
            let _ = v
                .g_mul_scalar_(beta2)
                .g_add_(&(grad.square() * (1.0 - beta2)));
            // p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
            let denom = (&*v / bias2).sqrt() + eps;
            let update = (&m / bias1) / denom * lr;
            match &mut state.master {
                Some(slot) => {
                    let master = slot.live(device, || p.detach().to_kind(Kind::Float));
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

    /// The names of [`AdamW::state`]'s tensors, without producing them.
    pub fn state_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for ((name, _), state) in self.params.iter().zip(&self.states) {
            for part in [StatePart::ExpAvg, StatePart::ExpAvgSq, StatePart::Master] {
                if state.slot(part).is_some() {
                    names.push(format!("{name}.{}", part.suffix()));
                }
            }
        }
        names.sort();
        names
    }

    /// The optimizer state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`, and
    /// `<param>.master` for master weights) plus the step count, for checkpoints. Pieces
    /// held are shared, not copied; a never allocated one is made on the host (zeros, or the
    /// parameter in f32 for a master) and allocates nothing on the device.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, i64) {
        let _guard = tch::no_grad_guard();
        let mut state = BTreeMap::new();
        for ((name, p), param_state) in self.params.iter().zip(&self.states) {
            for part in [StatePart::ExpAvg, StatePart::ExpAvgSq, StatePart::Master] {
                let Some(slot) = param_state.slot(part) else {
                    continue;
                };
                let tensor = match (slot.held(), part) {
                    (Some(t), _) => t.shallow_clone(),
                    (None, StatePart::Master) => {
                        p.detach().to_device(Device::Cpu).to_kind(Kind::Float)
                    }
                    (None, _) => zeros_for(p, Device::Cpu),
                };
                state.insert(format!("{name}.{}", part.suffix()), tensor);
            }
        }
        (state, self.step)
    }

    /// Checks that `state` holds every parameter's moments with the parameter's shape, and
    /// any master copies with it too; returns, per parameter and piece, the tensor to take
    /// (`None`: a master absent from `state`).
    fn checked<'a>(&self, state: &'a BTreeMap<String, Tensor>) -> Result<Vec<Sources<'a>>, String> {
        let mut out = Vec::with_capacity(self.params.len());
        for ((name, p), param_state) in self.params.iter().zip(&self.states) {
            let mut pieces = Vec::new();
            for part in [StatePart::ExpAvg, StatePart::ExpAvgSq, StatePart::Master] {
                if param_state.slot(part).is_none() {
                    continue;
                }
                let key = format!("{name}.{}", part.suffix());
                let src = state.get(&key);
                match src {
                    None if part != StatePart::Master => {
                        return Err(format!("optimizer state lacks {key}"));
                    }
                    Some(src) if src.size() != p.size() => {
                        return Err(format!(
                            "{key}: shape {:?}, parameter has {:?}",
                            src.size(),
                            p.size()
                        ));
                    }
                    _ => {}
                }
                pieces.push((part, src));
            }
            out.push(pieces);
        }
        Ok(out)
    }

    /// Restores a state written by [`AdamW::state`] onto the parameters' devices (copied);
    /// every parameter's moments must be present with the right shape. A master copy absent
    /// from `state` (a run that had none) is taken from the parameter as it is now. Nothing
    /// changes on an error.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let pieces = self.checked(state)?;
        for (((_, p), param_state), pieces) in self.params.iter().zip(&mut self.states).zip(pieces)
        {
            for (part, src) in pieces {
                let mut live = zeros_for(p, p.device());
                live.copy_(src.unwrap_or(p));
                *param_state.slot_mut(part).expect("checked") = Slot::Live(live);
            }
        }
        self.step = step;
        Ok(())
    }

    /// Like [`AdamW::load_state`], but keeps the tensors of `state` where they are (read
    /// from a file: on the host): a piece moves to its parameter's device
    /// at the first update that needs it, and a sharded optimizer takes only its slice (f32
    /// tensors are not copied). A master absent from `state` is taken from the parameter when needed.
    pub fn stage_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        let pieces = self.checked(state)?;
        for (param_state, pieces) in self.states.iter_mut().zip(pieces) {
            for (part, src) in pieces {
                *param_state.slot_mut(part).expect("checked") = match src {
                    Some(src) => Slot::Staged(src.to_kind(Kind::Float)),
                    None => Slot::Fresh,
                };
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

    #[test]
    fn state_is_allocated_at_the_first_update_only_for_updated_parameters() {
        tch::set_num_threads(1);
        let (a, b) = (ones_bf16(), ones_bf16());
        let mut optimizer = AdamW::with_master_weights(
            vec![
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            NO_DECAY,
        );
        assert_eq!(optimizer.allocated_state_elements(), 0);
        // The checkpoint's view of a fresh state: zeros and the parameter, made on the host.
        let (state, step) = optimizer.state();
        assert_eq!(step, 0);
        assert_eq!(values(&state["a.exp_avg"]), vec![0.0; 4]);
        assert_eq!(values(&state["b.master"]), vec![1.0; 4]);
        assert_eq!(state["b.master"].kind(), Kind::Float);
        assert_eq!(
            optimizer.state_names(),
            state.keys().cloned().collect::<Vec<_>>()
        );
        assert_eq!(optimizer.allocated_state_elements(), 0);
        // Only `a` gets a gradient: its m, v and master (3 x 4 elements) come into being.
        a.sum(Kind::Float).backward();
        optimizer.step(1e-3);
        assert_eq!(optimizer.allocated_state_elements(), 12);
        assert!(optimizer.held(0, StatePart::ExpAvg).is_some());
        assert!(optimizer.held(1, StatePart::ExpAvg).is_none());
        assert_eq!(values(&optimizer.state().0["b.exp_avg_sq"]), vec![0.0; 4]);
    }

    #[test]
    fn a_staged_state_steps_as_a_loaded_one_bit_for_bit() {
        tch::set_num_threads(1);
        let lr = 1e-3;
        let param = ones_bf16();
        let mut first =
            AdamW::with_master_weights(vec![("w".into(), param.shallow_clone())], NO_DECAY);
        constant_gradient_steps(&mut first, &param, 5, lr);
        let (state, step) = first.state();
        let saved: BTreeMap<String, Tensor> =
            state.iter().map(|(k, t)| (k.clone(), t.copy())).collect();
        let run = |staged: bool| {
            let p = param.detach().copy().set_requires_grad(true);
            let mut optimizer =
                AdamW::with_master_weights(vec![("w".into(), p.shallow_clone())], NO_DECAY);
            if staged {
                optimizer.stage_state(&saved, step).unwrap();
                assert_eq!(optimizer.allocated_state_elements(), 0);
                assert_eq!(optimizer.staged_state_elements(), 12);
            } else {
                optimizer.load_state(&saved, step).unwrap();
                assert_eq!(optimizer.allocated_state_elements(), 12);
            }
            constant_gradient_steps(&mut optimizer, &p, 3, lr);
            assert_eq!(optimizer.staged_state_elements(), 0);
            let (state, step) = optimizer.state();
            let state: Vec<Vec<f64>> = state.values().map(values).collect();
            (values(&p), state, step)
        };
        assert_eq!(run(true), run(false));
        // The saved tensors were copied, not updated in place.
        assert_eq!(values(&saved["w.exp_avg"]), values(&state["w.exp_avg"]));
    }

    #[test]
    fn a_bad_state_is_refused_and_changes_nothing() {
        let param = ones_bf16();
        let mut optimizer = AdamW::new(vec![("w".into(), param)], NO_DECAY);
        let mut state = BTreeMap::new();
        state.insert(
            "w.exp_avg".to_string(),
            Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)),
        );
        assert!(optimizer
            .stage_state(&state, 3)
            .unwrap_err()
            .contains("w.exp_avg_sq"));
        state.insert(
            "w.exp_avg_sq".to_string(),
            Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)),
        );
        assert!(optimizer
            .load_state(&state, 3)
            .unwrap_err()
            .contains("shape"));
        assert_eq!(optimizer.step_count(), 0);
        assert_eq!(
            optimizer.allocated_state_elements() + optimizer.staged_state_elements(),
            0
        );
    }
}
