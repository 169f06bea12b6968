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
use std::ops::Range;

use prime_collective::flat::{flatten, unflatten, FlatLayout};
use prime_collective::{broadcast_bytes, Collective, ReduceOp};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{LearnerError, Result};
use crate::optim::AdamW;
use crate::step::{PrimeModels, ScoredGroup};

/// Which collective implementation the ranks use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL on CUDA devices (when built with the `nccl` feature), the TCP ring otherwise.
    #[default]
    Auto,
    /// The TCP ring (any device; tensors go through host memory).
    Tcp,
    /// NCCL (CUDA only; needs the `nccl` feature).
    Nccl,
}

/// `[learner.parallel]`: how data-parallel ranks cooperate. The number of ranks and each
/// one's index come from the environment (`WORLD_SIZE`, `RANK`, ...), not from the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Shard the optimizer state over the ranks (ZeRO stage 1): AdamW's moments (and master
    /// weights) take 1/W of the memory on each rank; results are the same.
    #[serde(default)]
    pub zero1: bool,
    /// Size of a gradient bucket (MiB of f32) all-reduced at once without `zero1`.
    #[serde(default = "p_bucket_mb")]
    pub bucket_mb: usize,
    /// `auto`, `tcp` or `nccl`.
    #[serde(default)]
    pub backend: Backend,
    /// Seconds one collective may take before the rank fails (and the watchdog ends the
    /// process): a dead or stuck rank never hangs the others.
    #[serde(default = "p_collective_timeout")]
    pub collective_timeout_seconds: u64,
    /// Seconds every rank has to join the group.
    #[serde(default = "p_join_timeout")]
    pub join_timeout_seconds: u64,
    /// Seconds the other ranks wait for rank 0's next instruction: rank 0 collects rollouts
    /// and evaluates between steps, which takes far longer than a collective.
    #[serde(default = "p_idle_timeout")]
    pub idle_timeout_seconds: u64,
}

fn p_bucket_mb() -> usize {
    64
}
fn p_collective_timeout() -> u64 {
    600
}
fn p_join_timeout() -> u64 {
    600
}
fn p_idle_timeout() -> u64 {
    86_400
}

impl Default for ParallelConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// What rank 0 tells the other ranks to do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Take part in the step `iteration` (0-based) on `groups`.
    Step {
        /// Drives the learning-rate schedule.
        iteration: u64,
        /// The whole batch.
        groups: Vec<ScoredGroup>,
    },
    /// Take part in gathering the sharded optimizer state for a checkpoint.
    Checkpoint,
    /// The run is over.
    Stop,
}

/// The two trained models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trained {
    /// π_θ.
    Policy,
    /// The implicit PRM.
    Prm,
}

/// A rank's shard of one model's optimizer (ZeRO-1).
#[derive(Debug)]
struct Shard {
    /// The model's parameters (shallow clones), in the optimizer's order.
    params: Vec<Tensor>,
    names: Vec<String>,
    layout: FlatLayout,
    /// Flat length, a multiple of the world size.
    padded: usize,
    /// This rank's elements: `start .. start + len` of the flat vector.
    start: usize,
    len: usize,
    /// The f32 shard the optimizer updates (shared with the shard optimizer).
    values: Tensor,
    /// Whether `values` persists between steps as master weights; otherwise it is re-read
    /// from the parameters before each step, as the unsharded optimizer reads them.
    master: bool,
}

/// An optimizer in the unsharded form a checkpoint stores.
#[derive(Debug)]
pub enum FullOptimizer<'a> {
    /// The replica's own optimizer (not sharded).
    Own(&'a AdamW),
    /// Rebuilt from every rank's shard.
    Gathered(Box<AdamW>),
}

impl std::ops::Deref for FullOptimizer<'_> {
    type Target = AdamW;
    fn deref(&self) -> &AdamW {
        match self {
            Self::Own(optimizer) => optimizer,
            Self::Gathered(optimizer) => optimizer,
        }
    }
}

/// Name of the one parameter of a shard optimizer.
const SHARD_PARAM: &str = "zero1.shard";

/// A rank's view of the data-parallel group.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    config: ParallelConfig,
    /// Where the small tensors of collectives live (the models' device).
    device: Device,
    shards: [Option<Shard>; 2],
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("zero1", &self.config.zero1)
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
    /// `zero1`, each rank keeps only its shard of the optimizer state.
    pub fn attach(
        models: &mut PrimeModels,
        comm: Box<dyn Collective>,
        config: ParallelConfig,
    ) -> Result<()> {
        let device = models.policy.model.device();
        let mut dp = Self {
            comm,
            config,
            device,
            shards: [None, None],
        };
        if dp.world_size() > 1 {
            // Rank 0 may still be opening its run (building the world, a first evaluation):
            // the others wait for it as they wait for a batch.
            let idle = std::time::Duration::from_secs(dp.config.idle_timeout_seconds.max(1));
            let waiting = (dp.rank() > 0).then(|| dp.comm.set_op_timeout(idle));
            let synced = dp.sync_from_rank0(models);
            if let Some(limit) = waiting {
                dp.comm.set_op_timeout(limit);
            }
            synced?;
        }
        if dp.config.zero1 {
            for which in [Trained::Policy, Trained::Prm] {
                dp.shard_optimizer(models, which)?;
            }
        }
        tracing::info!(
            rank = dp.rank(),
            world_size = dp.world_size(),
            zero1 = dp.config.zero1,
            "data parallelism attached"
        );
        models.parallel = Some(dp);
        Ok(())
    }

    /// A group of one on `device`: every collective is the identity.
    pub fn single(device: Device) -> Self {
        Self {
            comm: Box::new(prime_collective::Single),
            config: ParallelConfig::default(),
            device,
            shards: [None, None],
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

    /// Whether the optimizer state is sharded.
    pub fn zero1(&self) -> bool {
        self.config.zero1
    }

    /// The collective group.
    pub fn comm(&mut self) -> &mut dyn Collective {
        &mut *self.comm
    }

    fn sync_from_rank0(&mut self, models: &mut PrimeModels) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut tensors: Vec<Tensor> = Vec::new();
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
            tensors.extend(vars.into_iter().map(|(_, t)| t));
        }
        let mut steps = Vec::new();
        for optimizer in [&models.policy_optimizer, &models.prm_optimizer] {
            let (state, step) = optimizer.state();
            tensors.extend(state.into_values());
            steps.push(step);
        }
        for t in &mut tensors {
            self.comm.broadcast(t, 0).map_err(comm_err)?;
        }
        let mut counts = Tensor::from_slice(&steps).to_device(self.device);
        self.comm.broadcast(&mut counts, 0).map_err(comm_err)?;
        let counts = Vec::<i64>::try_from(&counts.to_device(Device::Cpu))?;
        for (optimizer, step) in [&mut models.policy_optimizer, &mut models.prm_optimizer]
            .into_iter()
            .zip(counts)
        {
            // The moments were broadcast in place; this sets the step count.
            let (state, _) = optimizer.state();
            optimizer
                .load_state(&state, step)
                .map_err(LearnerError::Checkpoint)?;
        }
        Ok(())
    }

    fn optimizer_of(models: &mut PrimeModels, which: Trained) -> &mut AdamW {
        match which {
            Trained::Policy => &mut models.policy_optimizer,
            Trained::Prm => &mut models.prm_optimizer,
        }
    }

    /// Replaces the model's optimizer by one over this rank's shard, moments (and master
    /// weights) taken from the full optimizer.
    fn shard_optimizer(&mut self, models: &mut PrimeModels, which: Trained) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let full = Self::optimizer_of(models, which);
        let (state, step) = full.state();
        let names: Vec<String> = full.params().iter().map(|(n, _)| n.clone()).collect();
        let params: Vec<Tensor> = full
            .params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        let master = full.keeps_master_weights();
        let adamw = full.config();
        let layout = FlatLayout::new(&params);
        let world = self.world_size();
        let padded = layout.padded(world);
        let len = padded / world;
        let start = self.rank() * len;
        let shard_of = |suffix: &str, fallback: &[Tensor]| -> Tensor {
            let pieces: Vec<Tensor> = names
                .iter()
                .zip(fallback)
                .map(|(n, p)| {
                    state
                        .get(&format!("{n}.{suffix}"))
                        .map_or_else(|| p.shallow_clone(), Tensor::shallow_clone)
                })
                .collect();
            flatten(&pieces, 0..pieces.len(), padded, Kind::Float)
                .narrow(0, start as i64, len as i64)
                .copy()
        };
        let values = shard_of("master", &params);
        let mut shard_state = std::collections::BTreeMap::new();
        shard_state.insert(
            format!("{SHARD_PARAM}.exp_avg"),
            shard_of("exp_avg", &params),
        );
        shard_state.insert(
            format!("{SHARD_PARAM}.exp_avg_sq"),
            shard_of("exp_avg_sq", &params),
        );
        let mut optimizer = AdamW::new(
            vec![(SHARD_PARAM.to_string(), values.shallow_clone())],
            adamw,
        );
        optimizer
            .load_state(&shard_state, step)
            .map_err(LearnerError::Checkpoint)?;
        *Self::optimizer_of(models, which) = optimizer;
        self.shards[which as usize] = Some(Shard {
            params,
            names,
            layout,
            padded,
            start,
            len,
            values,
            master,
        });
        Ok(())
    }

    /// The rows of `rows` (whole groups of `k` responses) this rank works on.
    pub fn my_rows(&self, rows: &Range<usize>, k: usize) -> Range<usize> {
        let groups = part(rows.len() / k, self.world_size(), self.rank());
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

    fn update_sharded(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        max_norm: f64,
        lr: f64,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let params: Vec<Tensor> = self.shards[which as usize]
            .as_ref()
            .expect("sharded")
            .params
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        self.align_defined_grads(&params)?;
        let shard = self.shards[which as usize].as_mut().expect("sharded");
        let grads: Vec<Tensor> = shard.params.iter().map(Tensor::grad).collect();
        let flat = flatten(&grads, 0..grads.len(), shard.padded, Kind::Float);
        let mut shard_grad = Tensor::zeros([shard.len as i64], (Kind::Float, flat.device()));
        self.comm
            .reduce_scatter(&flat, &mut shard_grad, ReduceOp::Sum)
            .map_err(comm_err)?;
        // The global norm from every shard's sum of squares (as AdamW::clip_grad_norm).
        let mut square = [shard_grad.square().sum(Kind::Double).double_value(&[])];
        let shard = self.shards[which as usize].as_mut().expect("sharded");
        let (start, len, padded) = (shard.start, shard.len, shard.padded);
        let comm = &mut self.comm;
        if comm.world_size() > 1 {
            let mut t = Tensor::from_slice(&square).to_device(self.device);
            comm.all_reduce(&mut t, ReduceOp::Sum).map_err(comm_err)?;
            square[0] = t.double_value(&[0]);
        }
        let norm = square[0].sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let _ = shard_grad.g_mul_scalar_(max_norm / (norm + 1e-6));
        }
        if !shard.master {
            let current = flatten(&shard.params, 0..shard.params.len(), padded, Kind::Float);
            shard
                .values
                .copy_(&current.narrow(0, start as i64, len as i64));
        }
        Self::optimizer_of(models, which).step_with_grads(lr, &[shard_grad]);
        let mut full = Tensor::zeros([padded as i64], (Kind::Float, shard.values.device()));
        comm.all_gather(&shard.values, &mut full)
            .map_err(comm_err)?;
        // Parameters no rank has a gradient for are skipped, as the unsharded AdamW does.
        let mut targets: Vec<Tensor> = shard
            .params
            .iter()
            .map(|p| {
                if p.grad().defined() {
                    p.shallow_clone()
                } else {
                    Tensor::new()
                }
            })
            .collect();
        let mut offset = 0;
        for (i, size) in shard.layout.sizes.iter().enumerate() {
            if targets[i].defined() {
                let piece = full
                    .narrow(0, offset as i64, *size as i64)
                    .view_(targets[i].size());
                targets[i].copy_(&piece);
            }
            offset += size;
        }
        Ok(norm)
    }

    /// The full optimizer of `which` rebuilt from every rank's shard (a collective: every
    /// rank calls it), for a checkpoint in the unsharded format. Without `zero1` the
    /// optimizer is returned as is.
    pub fn full_optimizer<'a>(
        &mut self,
        models: &'a PrimeModels,
        which: Trained,
    ) -> Result<FullOptimizer<'a>> {
        let optimizer = match which {
            Trained::Policy => &models.policy_optimizer,
            Trained::Prm => &models.prm_optimizer,
        };
        let Some(shard) = &self.shards[which as usize] else {
            return Ok(FullOptimizer::Own(optimizer));
        };
        let _guard = tch::no_grad_guard();
        let (state, step) = optimizer.state();
        let mut gathered = Vec::new();
        let suffixes = ["exp_avg", "exp_avg_sq"];
        for suffix in suffixes {
            let part = &state[&format!("{SHARD_PARAM}.{suffix}")];
            let mut full = Tensor::zeros([shard.padded as i64], (Kind::Float, part.device()));
            self.comm.all_gather(part, &mut full).map_err(comm_err)?;
            gathered.push(full);
        }
        let mut full_values =
            Tensor::zeros([shard.padded as i64], (Kind::Float, shard.values.device()));
        self.comm
            .all_gather(&shard.values, &mut full_values)
            .map_err(comm_err)?;
        let named: Vec<(String, Tensor)> = shard
            .names
            .iter()
            .cloned()
            .zip(shard.params.iter().map(Tensor::shallow_clone))
            .collect();
        let mut rebuilt = if shard.master {
            AdamW::with_master_weights(named, optimizer.config())
        } else {
            AdamW::new(named, optimizer.config())
        };
        let mut full_state = std::collections::BTreeMap::new();
        let mut offset = 0i64;
        for (name, p) in shard.names.iter().zip(&shard.params) {
            let n = p.numel() as i64;
            for (suffix, flat) in suffixes.iter().zip(&gathered) {
                full_state.insert(
                    format!("{name}.{suffix}"),
                    flat.narrow(0, offset, n).view_(p.size()),
                );
            }
            if shard.master {
                full_state.insert(
                    format!("{name}.master"),
                    full_values.narrow(0, offset, n).view_(p.size()),
                );
            }
            offset += n;
        }
        rebuilt
            .load_state(&full_state, step)
            .map_err(LearnerError::Checkpoint)?;
        Ok(FullOptimizer::Gathered(Box::new(rebuilt)))
    }

    /// Rank 0: sends `command` to every other rank. Other ranks: wait for it (up to
    /// `idle_timeout_seconds`) and receive it.
    pub fn exchange(&mut self, command: Option<&Command>) -> Result<Command> {
        let bytes = match command {
            Some(c) => serde_json::to_vec(c).map_err(|e| LearnerError::Data(e.to_string()))?,
            None => Vec::new(),
        };
        let device = self.device;
        let idle = std::time::Duration::from_secs(self.config.idle_timeout_seconds.max(1));
        let waiting = command.is_none().then(|| self.comm.set_op_timeout(idle));
        let bytes = broadcast_bytes(&mut *self.comm, bytes, 0, device);
        if let Some(limit) = waiting {
            self.comm.set_op_timeout(limit);
        }
        let bytes = bytes.map_err(comm_err)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| LearnerError::Data(format!("a command from rank 0 is unreadable: {e}")))
    }
}

/// The loop of a rank other than 0: runs each step rank 0 announces and takes part in its
/// checkpoints, until rank 0 says stop (or the group fails). Returns the steps taken.
pub fn follow(models: &mut PrimeModels, config: &crate::config::LearnerConfig) -> Result<u64> {
    let mut steps = 0;
    loop {
        let dp = models
            .parallel
            .as_mut()
            .ok_or_else(|| LearnerError::Data("follow needs an attached group".into()))?;
        match dp.exchange(None)? {
            Command::Step { iteration, groups } => {
                crate::step::prime_step(models, &groups, config, iteration)?;
                steps += 1;
            }
            Command::Checkpoint => {
                let mut dp = models.parallel.take().expect("attached");
                let result = [Trained::Policy, Trained::Prm]
                    .into_iter()
                    .try_for_each(|which| dp.full_optimizer(models, which).map(drop));
                models.parallel = Some(dp);
                result?;
            }
            Command::Stop => return Ok(steps),
        }
    }
}

/// Forms this rank's group as `config` says, every operation under a watchdog: the TCP ring,
/// or NCCL on a CUDA `device` (with the `nccl` feature). `epoch` is the group generation the
/// launcher gives every rank of one start (`PRIME_GROUP_EPOCH`).
pub fn join_group(
    info: &prime_collective::RankInfo,
    config: &ParallelConfig,
    device: Device,
    epoch: u64,
) -> Result<Box<dyn Collective>> {
    use std::time::Duration;
    let limit = Duration::from_secs(config.collective_timeout_seconds.max(1));
    let join_timeout = Duration::from_secs(config.join_timeout_seconds.max(1));
    // The run's token proves membership of the group, as it does on every RPC.
    let token = std::env::var("PRIME_TOKEN").ok().filter(|t| !t.is_empty());
    let nccl = match config.backend {
        Backend::Auto => cfg!(feature = "nccl") && device.is_cuda(),
        Backend::Tcp => false,
        Backend::Nccl => true,
    };
    if nccl {
        #[cfg(feature = "nccl")]
        {
            let group = prime_collective::nccl::NcclGroup::join(
                info,
                epoch,
                join_timeout,
                token.as_deref(),
            )?;
            let abort = group.abort_handle();
            let dog = prime_collective::Watchdog::exiting(limit, move || abort.abort());
            return Ok(Box::new(prime_collective::Watched::new(group, dog)));
        }
        #[cfg(not(feature = "nccl"))]
        return Err(LearnerError::Config {
            path: "learner.parallel.backend".into(),
            message: "the NCCL backend needs a build with `--features nccl`".into(),
        });
    }
    let options = prime_collective::tcp::TcpOptions {
        join_timeout,
        op_timeout: limit,
        epoch,
        token,
    };
    let group = prime_collective::TcpGroup::join(info, options)?;
    let abort = group.abort_handle();
    // The ring's own deadline fails a late operation first; the watchdog is the backstop
    // for a process stuck anyway.
    let dog =
        prime_collective::Watchdog::exiting(limit + Duration::from_secs(10), move || abort.abort());
    Ok(Box::new(prime_collective::Watched::new(group, dog)))
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
