//! Data parallelism of the learner step: W ranks each hold a full replica of the policy and
//! the PRM, take a contiguous slice of whole groups of every mini-batch, and sum their
//! gradients once per optimizer step (after the last micro-batch). Micro-batch losses keep
//! their weight in the *global* mini-batch, so the summed gradient is the one a single
//! process computes on the whole batch: DP=W and DP=1 take the same steps.
//!
//! Forward-only passes (old, reference and PRM log-probs) are split the same way and their
//! rows gathered, so every rank computes rewards and advantages on the full batch. Rank 0
//! alone talks to actors, evaluates, publishes weights and writes checkpoints; it hands the
//! other ranks each batch as a [`Command`] broadcast.
//!
//! With `zero1` the optimizer state is sharded (ZeRO stage 1): gradients are reduce-scattered
//! over a flat f32 buffer, each rank runs AdamW on its 1/W of the elements, and the updated
//! shards are all-gathered back into the parameters.
//!
//! With `zero2` the gradients are sharded too (ZeRO stage 2): the backward pass recomputes
//! one decoder layer at a time and hands each layer's parameter gradients, as fresh tensors,
//! to [`ShardedGradSink`], which reduce-scatters them bucket by bucket into this rank's f32
//! gradient shard and drops them; no parameter's `.grad` is ever written. Every bucket is
//! split evenly over the ranks, so each rank owns 1/W of every bucket (not one contiguous
//! run of the model as with `zero1`): a reduce-scatter then moves only real gradient, and
//! the updated parameters come back one bucket at a time.
//!
//! With `zero3` the parameters are sharded too (ZeRO stage 3, [`zero3`]): each rank keeps its
//! chunk of every bucket of the policy's, the PRM's and the reference's weights, and every
//! pass gathers one stage (a decoder layer, the embeddings, the head) at a time through
//! [`DataParallel::param_gather`] or the gradient sink, freeing it after.

mod comm_thread;
mod protocol;
mod zero;
mod zero3;

pub use protocol::{join_group, Command};
pub use zero::{FullOptimizer, ShardedGradSink};
pub use zero3::{Resident, Role, ShardGather};

use std::ops::Range;

use prime_collective::flat::{flatten, unflatten, FlatLayout};
use prime_collective::{Collective, ReduceOp};
use tch::{Device, Kind, Tensor};

use crate::config::ParallelConfig;
use crate::error::{LearnerError, Result};
use crate::models::PrimeModels;
use crate::optim::{AdamW, StatePart};
use zero::{GradShard, Origin, Shard, PARTS};
use zero3::ParamShards;

/// The two trained models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// π_θ.
    Policy,
    /// The implicit PRM.
    Prm,
}

/// A rank's view of the data-parallel group.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    config: ParallelConfig,
    /// Where the small tensors of collectives live (the models' device).
    device: Device,
    shards: [Option<Shard>; 2],
    /// ZeRO-2: the gradient and optimizer shards (instead of `shards`).
    grad_shards: [Option<GradShard>; 2],
    /// ZeRO-3: the parameter shards, by [`Role`].
    param_shards: ParamShards,
    /// ZeRO-3 on the CPU backend: the thread `comm` runs on, where the next stage's gather
    /// is started ahead of its use.
    prefetch: Option<std::sync::Arc<comm_thread::CommThread>>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("zero1", &self.config.zero1)
            .field("zero2", &self.config.zero2)
            .field("zero3", &self.config.zero3)
            .finish()
    }
}

fn comm_err(e: prime_collective::CollectiveError) -> LearnerError {
    LearnerError::Collective(e)
}

/// Near-equal contiguous parts of `0..n`: part `i` of `parts` (the first ones one longer).
fn part(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

impl DataParallel {
    /// Joins `models` to the group `comm`: rank 0's weights and optimizer state are
    /// broadcast to every rank (so all start identical, whatever each loaded), then, with
    /// `zero1`, each rank keeps only its shard of the optimizer state. With sharding no rank
    /// ever holds a whole optimizer state on the device: the shards of a state rank 0 holds
    /// (loaded, possibly still on the host) are broadcast one bucket at a time, and a fresh
    /// optimizer's stay unallocated until the first step.
    pub fn attach(
        models: &mut PrimeModels,
        comm: Box<dyn Collective>,
        config: ParallelConfig,
    ) -> Result<Self> {
        let device = models.policy.model.device();
        let mut dp = Self {
            comm,
            config,
            device,
            shards: [None, None],
            grad_shards: [None, None],
            param_shards: [None, None, None],
            prefetch: None,
        };
        if dp.world_size() > 1 {
            // Rank 0 may still be opening its run (building the world, a first evaluation):
            // the others wait for it as they wait for a batch.
            let idle = std::time::Duration::from_secs(dp.config.idle_timeout_seconds.max(1));
            let waiting = (dp.rank() > 0).then(|| dp.comm.set_op_timeout(idle));
            let synced = dp.sync_weights_from_rank0(models);
            if let Some(limit) = waiting {
                dp.comm.set_op_timeout(limit);
            }
            synced?;
        }
        for which in [Trained::Policy, Trained::Prm] {
            let origin = dp.origin(Self::optimizer_of(models, which))?;
            if dp.zero2() {
                dp.shard_gradients(models, which, &origin)?;
            } else if dp.config.zero1 {
                dp.shard_optimizer(models, which, &origin)?;
            } else if dp.world_size() > 1 {
                dp.sync_optimizer_from_rank0(models, which, &origin)?;
            }
        }
        if dp.zero3() {
            for role in [Role::Policy, Role::Prm, Role::Reference] {
                dp.shard_params(models, role)?;
            }
            dp.start_comm_thread();
        }
        tracing::info!(
            rank = dp.rank(),
            world_size = dp.world_size(),
            zero1 = dp.config.zero1,
            zero2 = dp.config.zero2,
            zero3 = dp.config.zero3,
            "data parallelism attached"
        );
        Ok(dp)
    }

    /// A group of one on `device`: every collective is the identity.
    pub fn single(device: Device) -> Self {
        Self {
            comm: Box::new(prime_collective::Single),
            config: ParallelConfig::default(),
            device,
            shards: [None, None],
            grad_shards: [None, None],
            param_shards: [None, None, None],
            prefetch: None,
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Whether the optimizer state is sharded (`zero1`, or `zero2` or `zero3`, which imply
    /// it).
    pub fn zero1(&self) -> bool {
        self.config.zero1 || self.zero2()
    }

    /// Whether the gradients are sharded too (ZeRO-2, or ZeRO-3, which implies it): the
    /// backward passes of the trained models must then hand their gradients to
    /// [`DataParallel::grad_sink`].
    pub fn zero2(&self) -> bool {
        self.config.zero2 || self.config.zero3
    }

    /// The collective group.
    pub fn comm(&mut self) -> &mut dyn Collective {
        &mut *self.comm
    }

    /// Broadcasts rank 0's weights (policy, PRM and reference) to every rank.
    fn sync_weights_from_rank0(&mut self, models: &mut PrimeModels) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for lm in [
            Some(&models.policy),
            Some(&models.prm),
            models.reference.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let mut vars: Vec<(String, Tensor)> = lm.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, mut t) in vars {
                self.comm.broadcast(&mut t, 0).map_err(comm_err)?;
            }
        }
        Ok(())
    }

    /// What rank 0's `optimizer` holds (every rank gets rank 0's answer).
    fn origin(&mut self, optimizer: &AdamW) -> Result<Origin> {
        let mut flags = vec![optimizer.step_count()];
        for i in 0..optimizer.params().len() {
            flags.extend(PARTS.map(|part| i64::from(optimizer.held(i, part).is_some())));
        }
        if self.world_size() > 1 {
            let mut t = Tensor::from_slice(&flags).to_device(self.device);
            self.comm.broadcast(&mut t, 0).map_err(comm_err)?;
            flags = Vec::<i64>::try_from(&t.to_device(Device::Cpu))?;
        }
        Ok(Origin {
            step: flags[0],
            held: flags[1..]
                .chunks(PARTS.len())
                .map(|c| [c[0] != 0, c[1] != 0, c[2] != 0])
                .collect(),
        })
    }

    /// Without sharding: every piece of state rank 0 holds is broadcast into a whole tensor
    /// on every rank's device (one at a time; each rank needs the whole state anyway), the
    /// others are dropped, and the step count is rank 0's.
    fn sync_optimizer_from_rank0(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        origin: &Origin,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let rank = self.rank();
        let optimizer = Self::optimizer_of(models, which);
        for i in 0..optimizer.params().len() {
            let p = optimizer.params()[i].1.shallow_clone();
            for (k, part) in PARTS.into_iter().enumerate() {
                if part == StatePart::Master && !optimizer.keeps_master(i) {
                    continue;
                }
                if !origin.held[i][k] {
                    optimizer.clear(i, part);
                    continue;
                }
                let mut t = match optimizer.held(i, part).filter(|_| rank == 0) {
                    Some(held) => held.to_device(p.device()),
                    None => Tensor::zeros(p.size(), (Kind::Float, p.device())),
                };
                self.comm.broadcast(&mut t, 0).map_err(comm_err)?;
                optimizer.put(i, part, t);
            }
        }
        optimizer.set_step_count(origin.step);
        Ok(())
    }

    fn optimizer_of(models: &mut PrimeModels, which: Trained) -> &mut AdamW {
        match which {
            Trained::Policy => &mut models.policy_optimizer,
            Trained::Prm => &mut models.prm_optimizer,
        }
    }

    /// The rows of `rows` (whole groups of `k` responses) this rank works on.
    pub fn my_rows(&self, rows: &Range<usize>, k: usize) -> Range<usize> {
        self.rows_of_rank(rows, k, self.rank())
    }

    /// The rows of `rows` (whole groups of `k` responses) rank `rank` works on.
    pub fn rows_of_rank(&self, rows: &Range<usize>, k: usize, rank: usize) -> Range<usize> {
        let groups = part(rows.len() / k, self.world_size(), rank);
        rows.start + groups.start * k..rows.start + groups.end * k
    }

    /// Every rank's `local` rows (`[n_r, ...]`, rank r holding `my_rows(rows)`) in rank
    /// order: the full `[rows.len(), ...]` tensor on every rank.
    pub fn gather_rows(&mut self, local: &Tensor, rows: &Range<usize>, k: usize) -> Result<Tensor> {
        let world = self.world_size();
        if world == 1 {
            return Ok(local.shallow_clone());
        }
        let counts: Vec<i64> = (0..world)
            .map(|r| (part(rows.len() / k, world, r).len() * k) as i64)
            .collect();
        let most = *counts.iter().max().expect("one rank at least");
        let mut shape = local.size();
        let mine = shape[0];
        shape[0] = most;
        let padded = Tensor::zeros(&shape, (local.kind(), local.device()));
        if mine > 0 {
            padded.narrow(0, 0, mine).copy_(local);
        }
        shape[0] = most * world as i64;
        let mut all = Tensor::zeros(&shape, (local.kind(), local.device()));
        self.comm.all_gather(&padded, &mut all).map_err(comm_err)?;
        let pieces: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(r, &n)| all.narrow(0, r as i64 * most, n))
            .collect();
        Ok(Tensor::cat(&pieces, 0))
    }

    /// Sums `values` over the ranks, in place (f64).
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        if self.world_size() == 1 || values.is_empty() {
            return Ok(());
        }
        let mut t = Tensor::from_slice(values).to_device(self.device);
        self.comm
            .all_reduce(&mut t, ReduceOp::Sum)
            .map_err(comm_err)?;
        let summed = Vec::<f64>::try_from(&t.to_device(Device::Cpu))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Gives every parameter that has a gradient on some rank a (zero) gradient on every
    /// rank, so all ranks update the same set of parameters (a rank with no rows in a
    /// mini-batch ran no backward pass).
    fn align_defined_grads(&mut self, params: &[Tensor]) -> Result<()> {
        let mut defined: Vec<f64> = params
            .iter()
            .map(|p| f64::from(u8::from(p.grad().defined())))
            .collect();
        self.sum(&mut defined)?;
        for (p, anywhere) in params.iter().zip(defined) {
            if anywhere > 0.0 && !p.grad().defined() {
                // The only way to create a gradient in tch: a backward pass that adds zero.
                tch::with_grad(|| (p.sum(Kind::Float) * 0.0).backward());
            }
        }
        Ok(())
    }

    /// Clears the gradients of `which` before a mini-batch.
    pub fn zero_grad(&mut self, models: &mut PrimeModels, which: Trained) {
        if let Some(shard) = &mut self.grad_shards[which as usize] {
            let _ = shard.grad.zero_();
            shard.touched.fill(false);
            return;
        }
        match &self.shards[which as usize] {
            Some(shard) => {
                for p in &shard.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.detach_().zero_();
                    }
                }
            }
            None => Self::optimizer_of(models, which).zero_grad(),
        }
    }

    /// After the last micro-batch of a mini-batch: sums the gradients of `which` over the
    /// ranks, clips them to `max_norm` and takes the optimizer step. Returns the gradient
    /// norm before clipping (the global one, the same on every rank).
    pub fn update(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        max_norm: f64,
        lr: f64,
    ) -> Result<f64> {
        if let Some(mut shard) = self.grad_shards[which as usize].take() {
            let result = self.update_zero2(&mut shard, models, which, max_norm, lr);
            self.grad_shards[which as usize] = Some(shard);
            return result;
        }
        if self.shards[which as usize].is_some() {
            return self.update_sharded(models, which, max_norm, lr);
        }
        let optimizer = Self::optimizer_of(models, which);
        if self.world_size() > 1 {
            let _guard = tch::no_grad_guard();
            let params: Vec<Tensor> = optimizer
                .params()
                .iter()
                .map(|(_, p)| p.shallow_clone())
                .collect();
            self.align_defined_grads(&params)?;
            let mut grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
            let layout = FlatLayout::new(&grads);
            let bucket = (self.config.bucket_mb.max(1) << 20) / 4;
            for range in layout.buckets(bucket) {
                let len: usize = layout.sizes[range.clone()].iter().sum();
                let mut flat = flatten(&grads, range.clone(), len, Kind::Float);
                self.comm
                    .all_reduce(&mut flat, ReduceOp::Sum)
                    .map_err(comm_err)?;
                unflatten(&flat, &mut grads, range);
            }
        }
        let norm = optimizer.clip_grad_norm(max_norm);
        optimizer.step(lr);
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_in_order() {
        assert_eq!(
            (0..3).map(|i| part(5, 3, i)).collect::<Vec<_>>(),
            vec![0..2, 2..4, 4..5]
        );
        assert_eq!(
            (0..3).map(|i| part(1, 3, i)).collect::<Vec<_>>(),
            vec![0..1, 1..1, 1..1]
        );
    }
}
