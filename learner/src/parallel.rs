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
use std::collections::HashMap;
use std::ops::Range;

use prime_collective::flat::{flatten, unflatten, FlatLayout};
use prime_collective::{broadcast_bytes, Collective, ReduceOp};
use prime_model::training::GradSink;
use prime_model::Qwen2;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{LearnerError, Result};
use crate::optim::{AdamW, StatePart};
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

impl Backend {
    /// Whether this choice means NCCL for a process on `device`: `nccl` always, `auto` on
    /// CUDA in a build with the `nccl` feature.
    pub fn uses_nccl(self, device: Device) -> bool {
        match self {
            Backend::Auto => cfg!(feature = "nccl") && device.is_cuda(),
            Backend::Tcp => false,
            Backend::Nccl => true,
        }
    }
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
    /// Shard the gradients too (ZeRO stage 2; implies `zero1`): each decoder layer's
    /// gradients are reduce-scattered as soon as the backward pass has them, so no rank holds
    /// a whole model's gradients. Needs `learner.recompute_activations = true`.
    #[serde(default)]
    pub zero2: bool,
    /// Size of a gradient bucket (MiB of f32) all-reduced at once without `zero1`, or
    /// reduce-scattered (and all-gathered back) at once with `zero2`.
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

/// The pieces of a parameter's optimizer state, in the order [`Origin::held`] lists them.
const PARTS: [StatePart; 3] = [StatePart::ExpAvg, StatePart::ExpAvgSq, StatePart::Master];

/// What rank 0's optimizer holds when a rank attaches: the source of every rank's state.
#[derive(Debug)]
struct Origin {
    /// Rank 0's step count.
    step: i64,
    /// Per parameter and piece ([`PARTS`]), whether rank 0 holds it (loaded or updated);
    /// the others are zeros, or for a master the parameter itself.
    held: Vec<[bool; 3]>,
}

impl Origin {
    /// Whether rank 0 holds `part` of any parameter.
    fn any(&self, part: StatePart) -> bool {
        let k = PARTS.iter().position(|&p| p == part).expect("a part");
        self.held.iter().any(|h| h[k])
    }
}

/// Per parameter of `optimizer`, its piece `part` as this rank sources it for a shard: the
/// tensor held when rank 0 holds any of `part` (`origin`), else what a never allocated piece
/// is: zeros (an undefined tensor) for a moment, the parameter for a master (a parameter
/// without a master copy is its own).
fn source_pieces(optimizer: &AdamW, part: StatePart, origin: &Origin) -> Vec<Tensor> {
    optimizer
        .params()
        .iter()
        .enumerate()
        .map(|(i, (_, p))| {
            origin
                .any(part)
                .then(|| optimizer.held(i, part))
                .flatten()
                .unwrap_or_else(|| match part {
                    StatePart::Master => p.shallow_clone(),
                    _ => Tensor::new(),
                })
        })
        .collect()
}

/// Elements `start .. start + len` of the flat concatenation of `pieces` (of `sizes`
/// elements, each flattened; an undefined piece, and anything past the last, counts as
/// zeros), as a new f32 vector on `device`. Only the overlapping parts are copied.
fn flat_slice(
    pieces: &[Tensor],
    sizes: &[usize],
    start: usize,
    len: usize,
    device: Device,
) -> Tensor {
    let out = Tensor::zeros([len as i64], (Kind::Float, device));
    let mut offset = 0;
    for (t, &n) in pieces.iter().zip(sizes) {
        let (lo, hi) = (offset.max(start), (offset + n).min(start + len));
        if lo < hi && t.defined() {
            let piece = t
                .reshape(-1)
                .narrow(0, (lo - offset) as i64, (hi - lo) as i64);
            out.narrow(0, (lo - start) as i64, (hi - lo) as i64)
                .copy_(&piece);
        }
        offset += n;
    }
    out
}

/// Copies `data`, elements `start ..` of a flat concatenation of `whole` (of `sizes`
/// elements), into the tensors it covers (converting device and dtype); what lies past the
/// last tensor (padding) is dropped.
fn write_flat(whole: &[Tensor], sizes: &[usize], start: usize, data: &Tensor) {
    let len = data.numel();
    let mut offset = 0;
    for (t, &n) in whole.iter().zip(sizes) {
        let (lo, hi) = (offset.max(start), (offset + n).min(start + len));
        if lo < hi {
            t.view(-1)
                .narrow(0, (lo - offset) as i64, (hi - lo) as i64)
                .copy_(&data.narrow(0, (lo - start) as i64, (hi - lo) as i64));
        }
        offset += n;
    }
}

/// Host f32 zeros of each of `params`' shapes: where a gathered state is assembled.
fn host_zeros(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| Tensor::zeros(p.size(), (Kind::Float, Device::Cpu)))
        .collect()
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

/// Elements `from .. from + len` of parameter `param` (flattened), inside a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    param: usize,
    from: usize,
    len: usize,
}

/// Parameter elements reduce-scattered, and all-gathered back, as one flat f32 vector that
/// splits evenly over the ranks (ZeRO-2).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket {
    /// The pieces, back to back in the flat vector (zero padding after the last).
    segments: Vec<Segment>,
    /// Elements per rank: the bucket padded to a multiple of the world size, divided by it.
    chunk: usize,
    /// Where this bucket's chunk sits in every rank's shard.
    shard_offset: usize,
}

/// Name of the shard optimizer's parameter for bucket `b` (ZeRO-2).
fn bucket_param(b: usize) -> String {
    format!("zero2.bucket{b}")
}

impl Bucket {
    /// This rank's chunk of the bucket in a shard-long vector (a view).
    fn mine(&self, shard: &Tensor) -> Tensor {
        shard.narrow(0, self.shard_offset as i64, self.chunk as i64)
    }

    /// Flat `[chunk · world]` f32 vector of the bucket's pieces of `tensors` (one per
    /// parameter, each flattened; an undefined one counts as zeros).
    fn flatten(&self, tensors: &[Tensor], world: usize, device: Device) -> Tensor {
        let flat = Tensor::zeros([(self.chunk * world) as i64], (Kind::Float, device));
        let mut at = 0i64;
        for s in &self.segments {
            let t = &tensors[s.param];
            if t.defined() {
                let piece = t.reshape(-1).narrow(0, s.from as i64, s.len as i64);
                flat.narrow(0, at, s.len as i64).copy_(&piece);
            }
            at += s.len as i64;
        }
        flat
    }

    /// Copies the pieces of `flat` back into `tensors` (converting dtype), skipping the
    /// parameters `keep` says no.
    fn unflatten(&self, flat: &Tensor, tensors: &[Tensor], keep: impl Fn(usize) -> bool) {
        let mut at = 0i64;
        for s in &self.segments {
            if keep(s.param) {
                let piece = flat.narrow(0, at, s.len as i64);
                tensors[s.param]
                    .view(-1)
                    .narrow(0, s.from as i64, s.len as i64)
                    .copy_(&piece);
            }
            at += s.len as i64;
        }
    }
}

/// The buckets of ZeRO-2 for parameters of `sizes` elements: the stages of the backward
/// pass in order (parameter indices; one already placed by an earlier stage, a tied
/// embedding, is not placed again), then any parameter no stage names, each cut into
/// buckets of at most `bucket_elements` (a large tensor spans several). A bucket never mixes
/// stages, so each one is complete when its stage's gradients arrive.
fn plan_buckets(
    stages: &[Vec<usize>],
    sizes: &[usize],
    bucket_elements: usize,
    world: usize,
) -> Vec<Bucket> {
    let bucket_elements = bucket_elements.max(1);
    let mut placed = vec![false; sizes.len()];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for stage in stages {
        let mut group = Vec::new();
        for &p in stage {
            if !placed[p] {
                placed[p] = true;
                group.push(p);
            }
        }
        groups.push(group);
    }
    groups.push((0..sizes.len()).filter(|&p| !placed[p]).collect());
    let mut buckets = Vec::new();
    let mut shard_offset = 0;
    let mut close = |segments: &mut Vec<Segment>, filled: &mut usize| {
        if *filled > 0 {
            let chunk = filled.div_ceil(world);
            buckets.push(Bucket {
                segments: std::mem::take(segments),
                chunk,
                shard_offset,
            });
            shard_offset += chunk;
            *filled = 0;
        }
    };
    for group in groups {
        let (mut segments, mut filled) = (Vec::new(), 0);
        for p in group {
            let mut from = 0;
            while from < sizes[p] {
                let len = (sizes[p] - from).min(bucket_elements - filled);
                segments.push(Segment {
                    param: p,
                    from,
                    len,
                });
                (from, filled) = (from + len, filled + len);
                if filled == bucket_elements {
                    close(&mut segments, &mut filled);
                }
            }
        }
        close(&mut segments, &mut filled);
    }
    buckets
}

/// A rank's shard of one model's gradients and optimizer (ZeRO-2).
#[derive(Debug)]
struct GradShard {
    /// The model's parameters (shallow clones), in the optimizer's order.
    params: Vec<Tensor>,
    names: Vec<String>,
    /// Parameter index by data pointer: how a handed-over gradient finds its parameter.
    index: HashMap<usize, usize>,
    buckets: Vec<Bucket>,
    /// Per parameter, the buckets holding its elements.
    buckets_of: Vec<Vec<usize>>,
    /// The f32 shard the optimizer updates (shared with the shard optimizer).
    values: Tensor,
    /// This rank's f32 gradient shard: the sum over ranks and micro-batches so far.
    grad: Tensor,
    /// Which parameters got a gradient on this rank since the last `zero_grad`.
    touched: Vec<bool>,
    /// Whether `values` persists between steps as master weights.
    master: bool,
}

/// The data pointer of `t`, which identifies a parameter across shallow clones.
fn address(t: &Tensor) -> usize {
    t.data_ptr() as usize
}

/// Where a ZeRO-2 rank's backward pass hands its gradients (see [`GradSink`]): each call's
/// gradients are reduce-scattered bucket by bucket into the rank's gradient shard, then
/// dropped. Every rank must hand over the same stages in the same order. The first error
/// stops the communication and is returned by [`ShardedGradSink::finish`].
pub struct ShardedGradSink<'a> {
    comm: &'a mut dyn Collective,
    shard: &'a mut GradShard,
    device: Device,
    error: Option<LearnerError>,
}

impl ShardedGradSink<'_> {
    /// Ends the backward pass: its first error, if any.
    pub fn finish(self) -> Result<()> {
        self.error.map_or(Ok(()), Err)
    }

    fn reduce(&mut self, params: &[Tensor], grads: Vec<Tensor>) -> Result<()> {
        let world = self.comm.world_size();
        let mut local: Vec<Tensor> = Vec::new();
        let mut indices = Vec::with_capacity(params.len());
        for (p, g) in params.iter().zip(grads) {
            let &i = self.shard.index.get(&address(p)).ok_or_else(|| {
                LearnerError::Data("a gradient for a parameter the optimizer does not hold".into())
            })?;
            if local.is_empty() {
                local = self.shard.params.iter().map(|_| Tensor::new()).collect();
            }
            self.shard.touched[i] |= g.defined();
            local[i] = g;
            indices.push(i);
        }
        let mut buckets: Vec<usize> = indices
            .iter()
            .flat_map(|&i| self.shard.buckets_of[i].iter().copied())
            .collect();
        buckets.sort_unstable();
        buckets.dedup();
        for b in buckets {
            let bucket = &self.shard.buckets[b];
            let flat = bucket.flatten(&local, world, self.device);
            let mut mine = Tensor::zeros([bucket.chunk as i64], (Kind::Float, self.device));
            self.comm
                .reduce_scatter(&flat, &mut mine, ReduceOp::Sum)
                .map_err(comm_err)?;
            let _ = self
                .shard
                .grad
                .narrow(0, bucket.shard_offset as i64, bucket.chunk as i64)
                .g_add_(&mine);
        }
        Ok(())
    }
}

impl GradSink for ShardedGradSink<'_> {
    fn accept(&mut self, params: &[Tensor], grads: Vec<Tensor>) {
        if self.error.is_some() {
            return;
        }
        let _guard = tch::no_grad_guard();
        if let Err(e) = self.reduce(params, grads) {
            self.error = Some(e);
        }
    }
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
    /// ZeRO-2: the gradient and optimizer shards (instead of `shards`).
    grad_shards: [Option<GradShard>; 2],
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("zero1", &self.config.zero1)
            .field("zero2", &self.config.zero2)
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
    ) -> Result<()> {
        let device = models.policy.model.device();
        let mut dp = Self {
            comm,
            config,
            device,
            shards: [None, None],
            grad_shards: [None, None],
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
            if dp.config.zero2 {
                dp.shard_gradients(models, which, &origin)?;
            } else if dp.config.zero1 {
                dp.shard_optimizer(models, which, &origin)?;
            } else if dp.world_size() > 1 {
                dp.sync_optimizer_from_rank0(models, which, &origin)?;
            }
        }
        tracing::info!(
            rank = dp.rank(),
            world_size = dp.world_size(),
            zero1 = dp.config.zero1,
            zero2 = dp.config.zero2,
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
            grad_shards: [None, None],
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

    /// Whether the optimizer state is sharded (`zero1`, or `zero2`, which implies it).
    pub fn zero1(&self) -> bool {
        self.config.zero1 || self.config.zero2
    }

    /// Whether the gradients are sharded too (ZeRO-2): the backward passes of the trained
    /// models must then hand their gradients to [`DataParallel::grad_sink`].
    pub fn zero2(&self) -> bool {
        self.config.zero2
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

    /// Replaces the model's optimizer by one over this rank's shard, moments (and master
    /// weights) taken from rank 0's full optimizer (`origin`); moments rank 0 never
    /// allocated stay unallocated until the first step.
    fn shard_optimizer(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        origin: &Origin,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let full = Self::optimizer_of(models, which);
        let names: Vec<String> = full.params().iter().map(|(n, _)| n.clone()).collect();
        let params: Vec<Tensor> = full
            .params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        let master = full.keeps_master_weights();
        let adamw = full.config();
        let sources = PARTS.map(|part| source_pieces(full, part, origin));
        let layout = FlatLayout::new(&params);
        let world = self.world_size();
        let padded = layout.padded(world);
        let len = padded / world;
        let start = self.rank() * len;
        let [m, v, values] = &sources;
        let values = self.zero1_slice(
            values,
            &layout.sizes,
            padded,
            start,
            len,
            origin.any(StatePart::Master),
        )?;
        let mut optimizer = AdamW::new(
            vec![(SHARD_PARAM.to_string(), values.shallow_clone())],
            adamw,
        );
        for (part, pieces) in [(StatePart::ExpAvg, m), (StatePart::ExpAvgSq, v)] {
            if origin.any(part) {
                let shard = self.zero1_slice(pieces, &layout.sizes, padded, start, len, true)?;
                optimizer.put(0, part, shard);
            }
        }
        optimizer.set_step_count(origin.step);
        // The full optimizer (and any state it held) goes here.
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

    /// ZeRO-1: this rank's elements `start .. start + len` of the flat concatenation of
    /// `pieces` (see [`flat_slice`]; `padded` long in all). With `from_rank0` (and more than
    /// one rank) they are rank 0's, broadcast a bucket at a time, so no rank holds more than
    /// a bucket beyond its shard; otherwise this rank's own.
    fn zero1_slice(
        &mut self,
        pieces: &[Tensor],
        sizes: &[usize],
        padded: usize,
        start: usize,
        len: usize,
        from_rank0: bool,
    ) -> Result<Tensor> {
        let device = self.device;
        if !from_rank0 || self.world_size() == 1 {
            return Ok(flat_slice(pieces, sizes, start, len, device));
        }
        let out = Tensor::zeros([len as i64], (Kind::Float, device));
        let window = self.bucket_elements();
        let mut at = 0;
        while at < padded {
            let n = window.min(padded - at);
            let mut flat = if self.rank() == 0 {
                flat_slice(pieces, sizes, at, n, device)
            } else {
                Tensor::zeros([n as i64], (Kind::Float, device))
            };
            self.comm.broadcast(&mut flat, 0).map_err(comm_err)?;
            let (lo, hi) = (at.max(start), (at + n).min(start + len));
            if lo < hi {
                out.narrow(0, (lo - start) as i64, (hi - lo) as i64)
                    .copy_(&flat.narrow(0, (lo - at) as i64, (hi - lo) as i64));
            }
            at += n;
        }
        Ok(out)
    }

    /// ZeRO-2: replaces the model's optimizer by one over this rank's share of every
    /// gradient bucket (moments and master weights taken from rank 0's full optimizer,
    /// `origin`; moments it never allocated stay unallocated until the first step) and sets
    /// up the gradient shard the backward passes reduce into.
    fn shard_gradients(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        origin: &Origin,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let stage_tensors = match which {
            Trained::Policy => models.policy.model.gradient_stages(),
            Trained::Prm => models.prm.model.gradient_stages(),
        };
        let full = Self::optimizer_of(models, which);
        let names: Vec<String> = full.params().iter().map(|(n, _)| n.clone()).collect();
        let params: Vec<Tensor> = full
            .params()
            .iter()
            .map(|(_, p)| p.shallow_clone())
            .collect();
        let (master, adamw) = (full.keeps_master_weights(), full.config());
        let sources = PARTS.map(|part| source_pieces(full, part, origin));
        let index: HashMap<usize, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (address(p), i))
            .collect();
        let stages: Vec<Vec<usize>> = stage_tensors
            .iter()
            .map(|s| {
                s.iter()
                    .filter_map(|t| index.get(&address(t)).copied())
                    .collect()
            })
            .collect();
        let sizes: Vec<usize> = params.iter().map(Tensor::numel).collect();
        let device = self.device;
        let buckets = plan_buckets(&stages, &sizes, self.bucket_elements(), self.world_size());
        let len: usize = buckets.iter().map(|b| b.chunk).sum();
        let mut buckets_of = vec![Vec::new(); params.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            for s in &bucket.segments {
                if buckets_of[s.param].last() != Some(&b) {
                    buckets_of[s.param].push(b);
                }
            }
        }
        let [m, v, values] = &sources;
        let values = self.zero2_shard(&buckets, values, len, origin.any(StatePart::Master))?;
        // One optimizer parameter per bucket (views of `values`), so that AdamW's temporaries
        // are a bucket's share, not the whole shard's.
        let pieces: Vec<(String, Tensor)> = buckets
            .iter()
            .enumerate()
            .map(|(b, bucket)| (bucket_param(b), bucket.mine(&values)))
            .collect();
        let mut optimizer = AdamW::new(pieces, adamw);
        for (part, sources) in [(StatePart::ExpAvg, m), (StatePart::ExpAvgSq, v)] {
            if origin.any(part) {
                let moments = self.zero2_shard(&buckets, sources, len, true)?;
                for (b, bucket) in buckets.iter().enumerate() {
                    optimizer.put(b, part, bucket.mine(&moments));
                }
            }
        }
        optimizer.set_step_count(origin.step);
        // The full optimizer (and any state it held) goes here.
        *Self::optimizer_of(models, which) = optimizer;
        let touched = vec![false; params.len()];
        self.grad_shards[which as usize] = Some(GradShard {
            params,
            names,
            index,
            buckets,
            buckets_of,
            values,
            grad: Tensor::zeros([len as i64], (Kind::Float, device)),
            touched,
            master,
        });
        Ok(())
    }

    /// ZeRO-2: this rank's `len`-long shard of `pieces` (one per parameter, an undefined one
    /// counting as zeros): its chunk of every bucket. With `from_rank0` (and more than one
    /// rank) the buckets are rank 0's, broadcast one at a time; otherwise this rank's own.
    fn zero2_shard(
        &mut self,
        buckets: &[Bucket],
        pieces: &[Tensor],
        len: usize,
        from_rank0: bool,
    ) -> Result<Tensor> {
        let (world, rank, device) = (self.world_size(), self.rank(), self.device);
        let broadcast = from_rank0 && world > 1;
        let shard = Tensor::zeros([len as i64], (Kind::Float, device));
        for b in buckets {
            let n = b.chunk as i64;
            let mut flat = if broadcast && rank > 0 {
                Tensor::zeros([n * world as i64], (Kind::Float, device))
            } else {
                b.flatten(pieces, world, device)
            };
            if broadcast {
                self.comm.broadcast(&mut flat, 0).map_err(comm_err)?;
            }
            b.mine(&shard).copy_(&flat.narrow(0, rank as i64 * n, n));
        }
        Ok(shard)
    }

    /// ZeRO-2: the length of this rank's f32 gradient shard of `which` (about 1/W of the
    /// model's parameters); `None` without gradient sharding.
    pub fn gradient_shard_len(&self, which: Trained) -> Option<usize> {
        self.grad_shards[which as usize]
            .as_ref()
            .map(|s| s.grad.numel())
    }

    /// Elements of f32 in one bucket (`bucket_mb`).
    fn bucket_elements(&self) -> usize {
        (self.config.bucket_mb.max(1) << 20) / 4
    }

    /// ZeRO-2: the sink the backward passes of `which` hand their gradients to (one per
    /// pass; call [`ShardedGradSink::finish`] after it). `None` without gradient sharding.
    pub fn grad_sink(&mut self, which: Trained) -> Option<ShardedGradSink<'_>> {
        let shard = self.grad_shards[which as usize].as_mut()?;
        Some(ShardedGradSink {
            comm: &mut *self.comm,
            shard,
            device: self.device,
            error: None,
        })
    }

    /// ZeRO-2: takes part in one backward pass of `model` (the model `which`) without rows:
    /// hands over every stage with no gradient, so that this rank joins the reduce-scatters
    /// of ranks that have one more micro-batch than it.
    pub fn idle_backward(&mut self, model: &Qwen2, which: Trained) -> Result<()> {
        let Some(mut sink) = self.grad_sink(which) else {
            return Ok(());
        };
        for params in model.gradient_stages() {
            let none = params.iter().map(|_| Tensor::new()).collect();
            sink.accept(&params, none);
        }
        sink.finish()
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

    /// ZeRO-2's update: the gradient shard is already reduced; the global norm comes from
    /// every shard's sum of squares, AdamW updates the shard, and each bucket of updated
    /// values is all-gathered back into the parameters.
    fn update_zero2(
        &mut self,
        shard: &mut GradShard,
        models: &mut PrimeModels,
        which: Trained,
        max_norm: f64,
        lr: f64,
    ) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let (world, rank, device) = (self.world_size(), self.rank(), self.device);
        // Bucket by bucket, so that no temporary is as long as the shard.
        let mut square = [shard
            .buckets
            .iter()
            .map(|b| {
                b.mine(&shard.grad)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum::<f64>()];
        self.sum(&mut square)?;
        let norm = square[0].sqrt();
        // Parameters no rank has a gradient for are skipped, as the unsharded AdamW does.
        let mut anywhere: Vec<f64> = shard
            .touched
            .iter()
            .map(|&t| f64::from(u8::from(t)))
            .collect();
        self.sum(&mut anywhere)?;
        if max_norm > 0.0 && norm > max_norm {
            let _ = shard.grad.g_mul_scalar_(max_norm / (norm + 1e-6));
        }
        if !shard.master {
            for b in &shard.buckets {
                let n = b.chunk as i64;
                let flat = b.flatten(&shard.params, world, device);
                b.mine(&shard.values)
                    .copy_(&flat.narrow(0, rank as i64 * n, n));
            }
        }
        let grads: Vec<Tensor> = shard.buckets.iter().map(|b| b.mine(&shard.grad)).collect();
        Self::optimizer_of(models, which).step_with_grads(lr, &grads);
        for b in &shard.buckets {
            let mut flat = Tensor::zeros([(b.chunk * world) as i64], (Kind::Float, device));
            self.comm
                .all_gather(&b.mine(&shard.values), &mut flat)
                .map_err(comm_err)?;
            b.unflatten(&flat, &shard.params, |p| anywhere[p] > 0.0);
        }
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
            let current = flat_slice(&shard.params, &shard.layout.sizes, start, len, self.device);
            shard.values.copy_(&current);
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
    /// optimizer is returned as is. The shards are all-gathered a bucket at a time and the
    /// whole state is assembled on the host, never on the device.
    pub fn full_optimizer<'a>(
        &mut self,
        models: &'a PrimeModels,
        which: Trained,
    ) -> Result<FullOptimizer<'a>> {
        let optimizer = match which {
            Trained::Policy => &models.policy_optimizer,
            Trained::Prm => &models.prm_optimizer,
        };
        Ok(match self.gather(optimizer, which, true)? {
            Some(rebuilt) => FullOptimizer::Gathered(Box::new(rebuilt)),
            None => FullOptimizer::Own(optimizer),
        })
    }

    /// Takes part in [`DataParallel::full_optimizer`] on a rank that does not write the
    /// checkpoint: the same collectives, without assembling the state.
    pub fn contribute_full_optimizer(
        &mut self,
        models: &PrimeModels,
        which: Trained,
    ) -> Result<()> {
        let optimizer = match which {
            Trained::Policy => &models.policy_optimizer,
            Trained::Prm => &models.prm_optimizer,
        };
        self.gather(optimizer, which, false).map(drop)
    }

    /// The full optimizer gathered from the shards of `which` (`optimizer` is this rank's
    /// shard optimizer), assembled on the host when `keep`; `None` when it is not sharded
    /// or not kept.
    fn gather(&mut self, optimizer: &AdamW, which: Trained, keep: bool) -> Result<Option<AdamW>> {
        if let Some(shard) = self.grad_shards[which as usize].take() {
            let rebuilt = self.gather_zero2(&shard, optimizer, keep);
            self.grad_shards[which as usize] = Some(shard);
            return rebuilt;
        }
        if let Some(shard) = self.shards[which as usize].take() {
            let rebuilt = self.gather_zero1(&shard, optimizer, keep);
            self.shards[which as usize] = Some(shard);
            return rebuilt;
        }
        Ok(None)
    }

    /// ZeRO-1's [`DataParallel::gather`]: each rank's contiguous shard of the moments (and
    /// master weights), all-gathered a bucket's worth at a time.
    fn gather_zero1(
        &mut self,
        shard: &Shard,
        optimizer: &AdamW,
        keep: bool,
    ) -> Result<Option<AdamW>> {
        let _guard = tch::no_grad_guard();
        let (world, device) = (self.world_size(), self.device);
        let mut parts: Vec<(StatePart, Tensor)> = [StatePart::ExpAvg, StatePart::ExpAvgSq]
            .into_iter()
            .map(|part| {
                let mine = optimizer
                    .held(0, part)
                    .unwrap_or_else(|| Tensor::zeros([shard.len as i64], (Kind::Float, device)));
                (part, mine)
            })
            .collect();
        if shard.master {
            parts.push((StatePart::Master, shard.values.shallow_clone()));
        }
        // Elements of each rank's shard per round: a bucket in all.
        let window = self.bucket_elements().div_ceil(world).max(1);
        let mut full_state = std::collections::BTreeMap::new();
        for (part, mine) in parts {
            let whole = if keep {
                host_zeros(&shard.params)
            } else {
                Vec::new()
            };
            let mut at = 0;
            while at < shard.len {
                let n = window.min(shard.len - at);
                let mut flat = Tensor::zeros([(n * world) as i64], (Kind::Float, device));
                self.comm
                    .all_gather(&mine.narrow(0, at as i64, n as i64), &mut flat)
                    .map_err(comm_err)?;
                if keep {
                    for r in 0..world {
                        let piece = flat.narrow(0, (r * n) as i64, n as i64);
                        write_flat(&whole, &shard.layout.sizes, r * shard.len + at, &piece);
                    }
                }
                at += n;
            }
            for (name, t) in shard.names.iter().zip(whole) {
                full_state.insert(format!("{name}.{}", part.suffix()), t);
            }
        }
        if !keep {
            return Ok(None);
        }
        full_adamw(
            &shard.names,
            &shard.params,
            shard.master,
            optimizer,
            &full_state,
        )
        .map(Some)
    }

    /// ZeRO-2's [`DataParallel::gather`]: every bucket of the moments (and master weights)
    /// all-gathered into whole tensors on the host.
    fn gather_zero2(
        &mut self,
        shard: &GradShard,
        optimizer: &AdamW,
        keep: bool,
    ) -> Result<Option<AdamW>> {
        let _guard = tch::no_grad_guard();
        let (world, device) = (self.world_size(), self.device);
        // Per piece, this rank's chunk of every bucket.
        let mut parts: Vec<(StatePart, Vec<Tensor>)> = [StatePart::ExpAvg, StatePart::ExpAvgSq]
            .into_iter()
            .map(|part| {
                let chunks = shard
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(b, bucket)| {
                        optimizer.held(b, part).unwrap_or_else(|| {
                            Tensor::zeros([bucket.chunk as i64], (Kind::Float, device))
                        })
                    })
                    .collect();
                (part, chunks)
            })
            .collect();
        if shard.master {
            let chunks = shard
                .buckets
                .iter()
                .map(|b| b.mine(&shard.values))
                .collect();
            parts.push((StatePart::Master, chunks));
        }
        let mut full_state = std::collections::BTreeMap::new();
        for (part, chunks) in parts {
            let whole = if keep {
                host_zeros(&shard.params)
            } else {
                Vec::new()
            };
            for (b, mine) in shard.buckets.iter().zip(&chunks) {
                let mut flat = Tensor::zeros([(b.chunk * world) as i64], (Kind::Float, device));
                self.comm.all_gather(mine, &mut flat).map_err(comm_err)?;
                if keep {
                    b.unflatten(&flat, &whole, |_| true);
                }
            }
            for (name, t) in shard.names.iter().zip(whole) {
                full_state.insert(format!("{name}.{}", part.suffix()), t);
            }
        }
        if !keep {
            return Ok(None);
        }
        full_adamw(
            &shard.names,
            &shard.params,
            shard.master,
            optimizer,
            &full_state,
        )
        .map(Some)
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

/// The unsharded optimizer over the parameters `params` named `names`, with the gathered
/// `state` (on the host, where it stays until a step needs it) and the configuration and step
/// count of `shard_optimizer`, this rank's shard of it.
fn full_adamw(
    names: &[String],
    params: &[Tensor],
    master: bool,
    shard_optimizer: &AdamW,
    state: &std::collections::BTreeMap<String, Tensor>,
) -> Result<AdamW> {
    let named = names
        .iter()
        .cloned()
        .zip(params.iter().map(Tensor::shallow_clone))
        .collect();
    let config = shard_optimizer.config();
    let mut rebuilt = if master {
        AdamW::with_master_weights(named, config)
    } else {
        AdamW::new(named, config)
    };
    rebuilt
        .stage_state(state, shard_optimizer.step_count())
        .map_err(LearnerError::Checkpoint)?;
    Ok(rebuilt)
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
                    .try_for_each(|which| dp.contribute_full_optimizer(models, which));
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
    if config.backend.uses_nccl(device) {
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
    fn buckets_follow_the_stages_split_large_tensors_and_place_a_tied_weight_once() {
        // Parameters 0..4 of 5, 3, 8 and 2 elements; stages [3], [1, 2], [0, 3] (3 is tied).
        let stages = vec![vec![3], vec![1, 2], vec![0, 3]];
        let buckets = plan_buckets(&stages, &[5, 3, 8, 2], 6, 4);
        let seg = |param, from, len| Segment { param, from, len };
        let expected = [
            (vec![seg(3, 0, 2)], 1),
            (vec![seg(1, 0, 3), seg(2, 0, 3)], 2),
            (vec![seg(2, 3, 5)], 2),
            (vec![seg(0, 0, 5)], 2),
        ];
        assert_eq!(buckets.len(), expected.len());
        let mut offset = 0;
        for (bucket, (segments, chunk)) in buckets.iter().zip(expected) {
            assert_eq!(bucket.segments, segments);
            assert_eq!((bucket.chunk, bucket.shard_offset), (chunk, offset));
            offset += chunk;
        }
        // A parameter no stage names still gets a bucket.
        let buckets = plan_buckets(&[vec![1]], &[4, 4], 100, 2);
        assert_eq!(buckets[1].segments, vec![seg(0, 0, 4)]);
    }

    #[test]
    fn a_bucket_flattens_and_unflattens_its_pieces() {
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let b = Tensor::from_slice(&[5f32, 6., 7.]);
        let bucket = Bucket {
            segments: vec![
                Segment {
                    param: 1,
                    from: 1,
                    len: 2,
                },
                Segment {
                    param: 0,
                    from: 0,
                    len: 3,
                },
            ],
            chunk: 2,
            shard_offset: 0,
        };
        let flat = bucket.flatten(&[a.shallow_clone(), b.shallow_clone()], 3, Device::Cpu);
        assert_eq!(
            Vec::<f32>::try_from(&flat).unwrap(),
            vec![6., 7., 1., 2., 3., 0.]
        );
        let out = [a.zeros_like(), b.zeros_like()];
        bucket.unflatten(&(flat * 10.0), &out, |p| p == 0);
        assert_eq!(
            Vec::<f32>::try_from(&out[0].view(-1)).unwrap(),
            vec![10., 20., 30., 0.]
        );
        assert_eq!(Vec::<f32>::try_from(&out[1]).unwrap(), vec![0., 0., 0.]);
    }

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
