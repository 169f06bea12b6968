//! ZeRO stage 3: the parameters sharded too. Each rank keeps, per model (policy, PRM and
//! reference), its chunk of every parameter bucket ([`ParamShard`]); the variables of the
//! model hold no storage between passes. A pass gathers each stage's parameters just before
//! the stage runs and frees them after ([`ParamGather`]), so a rank holds a whole layer at a
//! time, never a whole model. The buckets of a trained model are those of its gradient shard
//! (ZeRO-2), so an optimizer step updates this rank's parameter chunk in place, with no
//! communication beyond the gradient norm.
use std::collections::HashMap;

use prime_collective::Collective;
use prime_model::training::{ParamGather, Stage};
use prime_model::{CausalLm, Qwen2};
use tch::{Device, Kind, Tensor};

use super::comm_thread::{CommThread, Started};
use super::zero::{address, plan_buckets, Bucket};
use super::{comm_err, DataParallel, Trained};
use crate::error::{LearnerError, Result};
use crate::models::PrimeModels;

/// The models whose parameters ZeRO-3 shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// π_θ.
    Policy,
    /// The implicit PRM.
    Prm,
    /// The frozen reference.
    Reference,
}

impl From<Trained> for Role {
    fn from(which: Trained) -> Self {
        match which {
            Trained::Policy => Self::Policy,
            Trained::Prm => Self::Prm,
        }
    }
}

impl Role {
    fn model(self, models: &PrimeModels) -> Option<&CausalLm> {
        match self {
            Self::Policy => Some(&models.policy),
            Self::Prm => Some(&models.prm),
            Self::Reference => models.reference.as_ref(),
        }
    }
}

/// Bytes a rank holds for training, by kind of state, counted from the tensors it holds
/// now (the models' variables as they stand, the shards, the optimizers' state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resident {
    /// Parameters of policy, PRM and reference: whole variables, or the rank's shards.
    pub params: usize,
    /// Gradients: the variables' `.grad`, or the rank's f32 gradient shards.
    pub grads: usize,
    /// AdamW's moments and master weights (or the f32 values a shard optimizer updates).
    pub optimizer: usize,
}

fn bytes(t: &Tensor) -> usize {
    if t.defined() {
        t.numel() * t.kind().elt_size_in_bytes()
    } else {
        0
    }
}

/// A rank's shard of one model's parameters (ZeRO-3).
#[derive(Debug)]
pub(crate) struct ParamShard {
    /// The model's variables (handles; they hold storage only while gathered).
    params: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    kind: Kind,
    device: Device,
    rank: usize,
    world: usize,
    buckets: Vec<Bucket>,
    buckets_of: Vec<Vec<usize>>,
    /// The parameters (indices) each stage uses.
    stages: HashMap<Stage, Vec<usize>>,
    /// This rank's chunk of every bucket, in the parameters' dtype.
    values: Tensor,
    /// Per parameter, how many gathers hold it whole now.
    holds: Vec<usize>,
    /// The stage whose buckets a communication thread is gathering ahead of its use.
    prefetched: Option<Prefetch>,
    /// Gathers a prefetch served.
    served: usize,
}

/// A stage's buckets being all-gathered on the communication thread: (bucket, flat result).
type Prefetch = (
    Stage,
    Vec<(usize, Started<prime_collective::Result<Tensor>>)>,
);

impl ParamShard {
    /// The shard of `params` (whole now, the same on every rank) over `buckets`: this rank's
    /// chunks are copied out; the variables keep their storage until [`ParamShard::free_all`].
    fn new(
        model: &Qwen2,
        params: Vec<Tensor>,
        buckets: Vec<Bucket>,
        (rank, world): (usize, usize),
    ) -> Result<Self> {
        let index: HashMap<usize, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (address(p), i))
            .collect();
        let mut stages = HashMap::new();
        for stage in model.forward_stages() {
            let mut used = Vec::new();
            for t in model.stage_parameters(stage) {
                let &i = index.get(&address(&t)).ok_or_else(|| {
                    LearnerError::Data(format!("ZeRO-3: a parameter of {stage:?} is not sharded"))
                })?;
                if !used.contains(&i) {
                    used.push(i);
                }
            }
            stages.insert(stage, used);
        }
        let mut buckets_of = vec![Vec::new(); params.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            for s in &bucket.segments {
                if buckets_of[s.param].last() != Some(&b) {
                    buckets_of[s.param].push(b);
                }
            }
        }
        let kind = params.first().map_or(Kind::Float, Tensor::kind);
        let device = model.device();
        let len: usize = buckets.iter().map(|b| b.chunk).sum();
        let values = Tensor::zeros([len as i64], (kind, device));
        for b in &buckets {
            let n = b.chunk as i64;
            let flat = b.flatten(&params, world, device);
            b.mine(&values).copy_(&flat.narrow(0, rank as i64 * n, n));
        }
        Ok(Self {
            shapes: params.iter().map(Tensor::size).collect(),
            holds: vec![0; params.len()],
            params,
            kind,
            device,
            rank,
            world,
            buckets,
            buckets_of,
            stages,
            values,
            prefetched: None,
            served: 0,
        })
    }

    /// Gives every variable back its storage: none until a gather.
    fn free_all(&mut self) {
        for p in 0..self.params.len() {
            self.free(p);
        }
    }

    fn free(&self, p: usize) {
        let empty = Tensor::empty([0], (self.kind, self.device));
        self.params[p].shallow_clone().set_data(&empty);
    }

    /// All-gathers the buckets `buckets` and copies their pieces into `whole` (one tensor per
    /// parameter; undefined ones are skipped).
    fn all_gather(
        &self,
        comm: &mut dyn Collective,
        buckets: &[usize],
        whole: &[Tensor],
    ) -> Result<()> {
        for &b in buckets {
            let bucket = &self.buckets[b];
            let size = (bucket.chunk * self.world) as i64;
            let mut flat = Tensor::empty([size], (self.kind, self.device));
            comm.all_gather(&bucket.mine(&self.values), &mut flat)
                .map_err(comm_err)?;
            bucket.unflatten(&flat, whole, |p| whole[p].defined());
        }
        Ok(())
    }

    /// Makes the parameters of `stage` whole (a collective), registering their new
    /// addresses in `index` (a gradient shard's lookup). With a communication thread
    /// (`prefetch`) the buckets of `next` are then started there, to travel while this stage
    /// computes, and the gather of `next` waits for them. Every rank makes the same calls, so
    /// the operations line up.
    pub(super) fn gather(
        &mut self,
        comm: &mut dyn Collective,
        prefetch: Option<&CommThread>,
        (stage, next): (Stage, Option<Stage>),
        index: Option<&mut HashMap<usize, usize>>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let used = self.stages.get(&stage).cloned().unwrap_or_default();
        let wanted: Vec<usize> = used
            .iter()
            .copied()
            .filter(|&p| self.holds[p] == 0)
            .collect();
        for &p in &used {
            self.holds[p] += 1;
        }
        let mut whole: Vec<Tensor> = self.params.iter().map(|_| Tensor::new()).collect();
        for &p in &wanted {
            whole[p] = Tensor::empty(self.shapes[p].as_slice(), (self.kind, self.device));
        }
        match self.prefetched.take() {
            Some((ahead, started)) if ahead == stage => {
                self.served += 1;
                for (b, flat) in started {
                    let flat = flat.wait().and_then(|r| r).map_err(comm_err)?;
                    self.buckets[b].unflatten(&flat, &whole, |p| whole[p].defined());
                }
            }
            other => {
                if let Some((_, started)) = other {
                    // Not along this pass's hints: waited for and dropped.
                    for (_, flat) in started {
                        drop(flat.wait().and_then(|r| r).map_err(comm_err)?);
                    }
                }
                let buckets = self.buckets_of_params(&wanted);
                self.all_gather(comm, &buckets, &whole)?;
            }
        }
        let mut index = index;
        for &p in &wanted {
            self.params[p].shallow_clone().set_data(&whole[p]);
            if let Some(index) = index.as_deref_mut() {
                index.insert(address(&self.params[p]), p);
            }
        }
        if let (Some(thread), Some(next)) = (prefetch, next) {
            self.prefetched = Some((next, self.start_gather(thread, next)));
        }
        Ok(())
    }

    /// The buckets holding any of `params`, in order.
    fn buckets_of_params(&self, params: &[usize]) -> Vec<usize> {
        let mut buckets: Vec<usize> = params
            .iter()
            .flat_map(|&p| self.buckets_of[p].iter().copied())
            .collect();
        buckets.sort_unstable();
        buckets.dedup();
        buckets
    }

    /// Starts all-gathering every bucket of `stage`'s parameters on `thread`.
    fn start_gather(
        &self,
        thread: &CommThread,
        stage: Stage,
    ) -> Vec<(usize, Started<prime_collective::Result<Tensor>>)> {
        let used = self.stages.get(&stage).cloned().unwrap_or_default();
        self.buckets_of_params(&used)
            .into_iter()
            .map(|b| {
                let bucket = &self.buckets[b];
                let size = (bucket.chunk * self.world) as i64;
                let mut flat = Tensor::empty([size], (self.kind, self.device));
                let mine = bucket.mine(&self.values);
                let started =
                    thread.start(move |comm| comm.all_gather(&mine, &mut flat).map(|()| flat));
                (b, started)
            })
            .collect()
    }

    /// Ends a pass: a prefetch it did not use is waited for and dropped.
    pub(super) fn drain(&mut self) -> Result<()> {
        if let Some((_, started)) = self.prefetched.take() {
            for (_, flat) in started {
                drop(flat.wait().and_then(|r| r).map_err(comm_err)?);
            }
        }
        Ok(())
    }

    /// The pass is done with `stage`: parameters no other gather holds are freed.
    pub(super) fn release(&mut self, stage: Stage, index: Option<&mut HashMap<usize, usize>>) {
        let used = self.stages.get(&stage).cloned().unwrap_or_default();
        let mut index = index;
        for p in used {
            self.holds[p] = self.holds[p].saturating_sub(1);
            if self.holds[p] == 0 {
                if let Some(index) = index.as_deref_mut() {
                    index.remove(&address(&self.params[p]));
                }
                self.free(p);
            }
        }
    }

    /// Whether the shard optimizer's f32 `values` are this shard's own tensor (f32
    /// parameters without master weights): then there is nothing to copy either way.
    fn is(&self, values: &Tensor) -> bool {
        address(values) == address(&self.values) && values.kind() == self.kind
    }

    /// Before a step without master weights: the f32 values the optimizer updates are the
    /// parameters' current ones.
    pub(super) fn read_values(&self, values: &Tensor) {
        if !self.is(values) {
            values.shallow_clone().copy_(&self.values);
        }
    }

    /// This rank's elements of the parameters `params` (indices): (offset in the shard,
    /// copy) pieces, to put back after a step that must not change them.
    pub(super) fn values_of(&self, params: &[usize]) -> Vec<(i64, Tensor)> {
        let rank = self.rank;
        let mut kept = Vec::new();
        for b in &self.buckets {
            let mine = (rank * b.chunk, (rank + 1) * b.chunk);
            let mut at = 0;
            for s in &b.segments {
                let (lo, hi) = (at.max(mine.0), (at + s.len).min(mine.1));
                if lo < hi && params.contains(&s.param) {
                    let offset = (b.shard_offset + lo - mine.0) as i64;
                    let piece = self.values.narrow(0, offset, (hi - lo) as i64).copy();
                    kept.push((offset, piece));
                }
                at += s.len;
            }
        }
        kept
    }

    /// After a step: the updated f32 `values` become the parameters' (in their dtype), but
    /// for the `kept` pieces ([`ParamShard::values_of`]), which no rank had a gradient for.
    pub(super) fn write_values(&self, values: &Tensor, kept: &[(i64, Tensor)]) {
        if !self.is(values) {
            self.values.shallow_clone().copy_(values);
        }
        for (offset, piece) in kept {
            self.values
                .narrow(0, *offset, piece.numel() as i64)
                .copy_(piece);
        }
    }
}

/// Gathers the stages of a pass without gradients from a ZeRO-3 parameter shard (see
/// [`DataParallel::param_gather`]). The first error stops the communication and is returned
/// by [`ShardGather::finish`].
pub struct ShardGather<'a> {
    comm: &'a mut dyn Collective,
    prefetch: Option<&'a CommThread>,
    shard: &'a mut ParamShard,
    error: Option<LearnerError>,
}

impl ShardGather<'_> {
    /// Ends the pass: its first error, if any.
    pub fn finish(self) -> Result<()> {
        let drained = self.shard.drain();
        self.error.map_or(drained, Err)
    }
}

impl ParamGather for ShardGather<'_> {
    fn gather(&mut self, stage: Stage, next: Option<Stage>) {
        if self.error.is_none() {
            let result = self
                .shard
                .gather(&mut *self.comm, self.prefetch, (stage, next), None);
            self.error = result.err();
        }
    }

    fn release(&mut self, stage: Stage) {
        self.shard.release(stage, None);
    }
}

impl DataParallel {
    /// Whether the parameters are sharded (ZeRO-3): every pass over a model must then gather
    /// its stages through [`DataParallel::param_gather`] or [`DataParallel::grad_sink`].
    pub fn zero3(&self) -> bool {
        self.config.zero3
    }

    /// ZeRO-3: shards the parameters of `role` (whole and the same on every rank now) and
    /// frees the variables. A trained model's buckets are its gradient shard's, which must
    /// exist ([`DataParallel::shard_gradients`]) and hold every variable of the model.
    pub(super) fn shard_params(&mut self, models: &PrimeModels, role: Role) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let Some(lm) = role.model(models) else {
            return Ok(());
        };
        let place = (self.rank(), self.world_size());
        let variables = lm.vs.variables().len();
        let (params, buckets) = match role {
            Role::Policy | Role::Prm => {
                let which = if role == Role::Policy {
                    Trained::Policy
                } else {
                    Trained::Prm
                };
                let grads = self.grad_shards[which as usize]
                    .as_ref()
                    .expect("ZeRO-3 shards the gradients first");
                if grads.params.len() != variables {
                    return Err(LearnerError::Config {
                        path: "learner.parallel.zero3".into(),
                        message: format!(
                            "parameter sharding needs every variable trained: {variables} \
                             variables, {} trained",
                            grads.params.len()
                        ),
                    });
                }
                let params = grads.params.iter().map(Tensor::shallow_clone).collect();
                (params, grads.buckets.clone())
            }
            Role::Reference => {
                let mut named: Vec<(String, Tensor)> = lm.vs.variables().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                let params: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
                let index: HashMap<usize, usize> = params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (address(p), i))
                    .collect();
                let stages: Vec<Vec<usize>> = lm
                    .model
                    .forward_stages()
                    .into_iter()
                    .rev()
                    .map(|stage| {
                        lm.model
                            .stage_parameters(stage)
                            .iter()
                            .filter_map(|t| index.get(&address(t)).copied())
                            .collect()
                    })
                    .collect();
                let sizes: Vec<usize> = params.iter().map(Tensor::numel).collect();
                let buckets = plan_buckets(&stages, &sizes, self.bucket_elements(), place.1);
                (params, buckets)
            }
        };
        let mut shard = ParamShard::new(&lm.model, params, buckets, place)?;
        if let Role::Policy | Role::Prm = role {
            let grads = self.grad_shards[role as usize]
                .as_mut()
                .expect("ZeRO-3 shards the gradients first");
            // f32 parameters without master weights: the optimizer updates the shard itself.
            if !grads.master && shard.kind == Kind::Float {
                shard.values = grads.values.shallow_clone();
            }
            // Addresses change with every gather: each one registers its parameters.
            grads.index.clear();
        }
        lm.model.drop_fused();
        shard.free_all();
        self.param_shards[role as usize] = Some(shard);
        Ok(())
    }

    /// ZeRO-3 on the CPU backend with several ranks: moves the group onto a communication
    /// thread, so that each pass's next stage is gathered while the current one computes.
    /// (On CUDA the collectives stay on the compute thread: the overlap there is a second
    /// stream's, not done yet.)
    pub(super) fn start_comm_thread(&mut self) {
        if !self.zero3() || self.world_size() < 2 || self.device != Device::Cpu {
            return;
        }
        let comm = std::mem::replace(&mut self.comm, Box::new(prime_collective::Single));
        let thread = std::sync::Arc::new(CommThread::spawn(comm));
        self.comm = Box::new(super::comm_thread::ThreadedComm(thread.clone()));
        self.prefetch = Some(thread);
    }

    /// ZeRO-3: where a pass over `role` without gradients gathers its stages (call
    /// [`ShardGather::finish`] after it). `None` without parameter sharding.
    pub fn param_gather(&mut self, role: Role) -> Option<ShardGather<'_>> {
        let shard = self.param_shards[role as usize].as_mut()?;
        Some(ShardGather {
            comm: &mut *self.comm,
            prefetch: self.prefetch.as_deref(),
            shard,
            error: None,
        })
    }

    /// ZeRO-3: how many stage gathers of `role` were served by a prefetch started on the
    /// communication thread while the stage before computed (0 without one).
    pub fn prefetched_gathers(&self, role: Role) -> usize {
        self.param_shards[role as usize]
            .as_ref()
            .map_or(0, |shard| shard.served)
    }

    /// ZeRO-3: takes part in one pass without gradients over `model` (the model `role`)
    /// without rows ([`Qwen2::idle_forward`]).
    pub fn idle_forward(&mut self, model: &Qwen2, role: Role) -> Result<()> {
        let Some(mut gather) = self.param_gather(role) else {
            return Ok(());
        };
        model.idle_forward(&mut gather);
        gather.finish()
    }

    /// ZeRO-3: gathers every parameter of `role` whole, a bucket at a time (a collective:
    /// every rank calls it). With `keep` the variables then hold them on that device (the
    /// host for a checkpoint, the model's device to sample) until [`DataParallel::reshard`];
    /// otherwise this rank only takes part. Without parameter sharding nothing happens.
    pub fn unshard(&mut self, role: Role, keep: Option<Device>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let Some(shard) = self.param_shards[role as usize].as_ref() else {
            return Ok(());
        };
        let whole: Vec<Tensor> = shard
            .shapes
            .iter()
            .map(|s| match keep {
                Some(device) => Tensor::zeros(s.as_slice(), (shard.kind, device)),
                None => Tensor::new(),
            })
            .collect();
        let all: Vec<usize> = (0..shard.buckets.len()).collect();
        shard.all_gather(&mut *self.comm, &all, &whole)?;
        if keep.is_some() {
            for (p, t) in shard.params.iter().zip(&whole) {
                p.shallow_clone().set_data(t);
            }
        }
        Ok(())
    }

    /// ZeRO-3, after a step: rank 0 gets the policy whole on `device` (to publish it,
    /// evaluate it, sample from it) and the PRM whole on the host (to publish it on request
    /// and checkpoint it); the other ranks take part. [`DataParallel::release_outputs`]
    /// frees them before the next step.
    pub fn gather_outputs(&mut self, device: Device) -> Result<()> {
        let lead = self.rank() == 0;
        self.unshard(Role::Policy, lead.then_some(device))?;
        self.unshard(Role::Prm, lead.then_some(Device::Cpu))
    }

    /// ZeRO-3: frees what [`DataParallel::gather_outputs`] kept.
    pub fn release_outputs(&mut self) {
        self.reshard(Role::Policy);
        self.reshard(Role::Prm);
    }

    /// ZeRO-3: frees what [`DataParallel::unshard`] kept.
    pub fn reshard(&mut self, role: Role) {
        if let Some(shard) = self.param_shards[role as usize].as_mut() {
            shard.holds.fill(0);
            shard.free_all();
        }
    }

    /// What this rank holds for training now, counted from its tensors ([`Resident`]).
    pub fn resident(&self, models: &PrimeModels) -> Resident {
        let mut resident = Resident::default();
        for role in [Role::Policy, Role::Prm, Role::Reference] {
            let Some(lm) = role.model(models) else {
                continue;
            };
            for t in lm.vs.variables().values() {
                resident.params += bytes(t);
                resident.grads += bytes(&t.grad());
            }
            if let Some(shard) = &self.param_shards[role as usize] {
                resident.params += bytes(&shard.values);
            }
        }
        for which in [Trained::Policy, Trained::Prm] {
            let optimizer = match which {
                Trained::Policy => &models.policy_optimizer,
                Trained::Prm => &models.prm_optimizer,
            };
            resident.optimizer += 4 * optimizer.allocated_state_elements();
            if let Some(grads) = &self.grad_shards[which as usize] {
                resident.grads += bytes(&grads.grad);
                let shared = self.param_shards[which as usize]
                    .as_ref()
                    .is_some_and(|p| p.is(&grads.values));
                if !shared {
                    // The f32 values a shard optimizer updates: its master weights.
                    resident.optimizer += bytes(&grads.values);
                }
            }
        }
        resident
    }
}

/// The parameter shards of a ZeRO-3 rank: policy, PRM, reference.
pub(super) type ParamShards = [Option<ParamShard>; 3];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_index_like_trained() {
        assert_eq!(
            Role::from(Trained::Policy) as usize,
            Trained::Policy as usize
        );
        assert_eq!(Role::from(Trained::Prm) as usize, Trained::Prm as usize);
    }
}
