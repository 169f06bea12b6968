//! ZeRO sharding of the data-parallel group: the optimizer state (stage 1) and the gradients
//! (stage 2) split over the ranks, and gathered whole again for a checkpoint.
use std::collections::HashMap;

use prime_collective::flat::{flatten, FlatLayout};
use prime_collective::{Collective, ReduceOp};
use prime_model::training::{GradSink, ParamGather, Stage};
use prime_model::Qwen2;
use tch::{Device, Kind, Tensor};

use super::comm_thread::CommThread;
use super::zero3::{ParamShard, Role};
use super::{comm_err, DataParallel, Trained};
use crate::error::{LearnerError, Result};
use crate::models::PrimeModels;
use crate::optim::{AdamW, StatePart};

/// The pieces of a parameter's optimizer state, in the order [`Origin::held`] lists them.
pub(super) const PARTS: [StatePart; 3] =
    [StatePart::ExpAvg, StatePart::ExpAvgSq, StatePart::Master];

/// What rank 0's optimizer holds when a rank attaches: the source of every rank's state.
#[derive(Debug)]
pub(super) struct Origin {
    /// Rank 0's step count.
    pub(super) step: i64,
    /// Per parameter and piece ([`PARTS`]), whether rank 0 holds it (loaded or updated);
    /// the others are zeros, or for a master the parameter itself.
    pub(super) held: Vec<[bool; 3]>,
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
pub(super) fn source_pieces(optimizer: &AdamW, part: StatePart, origin: &Origin) -> Vec<Tensor> {
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
pub(super) fn flat_slice(
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
pub(super) fn write_flat(whole: &[Tensor], sizes: &[usize], start: usize, data: &Tensor) {
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
pub(super) fn host_zeros(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| Tensor::zeros(p.size(), (Kind::Float, Device::Cpu)))
        .collect()
}

/// A rank's shard of one model's optimizer (ZeRO-1).
#[derive(Debug)]
pub(super) struct Shard {
    /// The model's parameters (shallow clones), in the optimizer's order.
    pub(super) params: Vec<Tensor>,
    pub(super) names: Vec<String>,
    pub(super) layout: FlatLayout,
    /// Flat length, a multiple of the world size.
    pub(super) padded: usize,
    /// This rank's elements: `start .. start + len` of the flat vector.
    pub(super) start: usize,
    pub(super) len: usize,
    /// The f32 shard the optimizer updates (shared with the shard optimizer).
    pub(super) values: Tensor,
    /// Whether `values` persists between steps as master weights; otherwise it is re-read
    /// from the parameters before each step, as the unsharded optimizer reads them.
    pub(super) master: bool,
}

/// Elements `from .. from + len` of parameter `param` (flattened), inside a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) param: usize,
    pub(super) from: usize,
    pub(super) len: usize,
}

/// Parameter elements reduce-scattered, and all-gathered back, as one flat f32 vector that
/// splits evenly over the ranks (ZeRO-2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bucket {
    /// The pieces, back to back in the flat vector (zero padding after the last).
    pub(super) segments: Vec<Segment>,
    /// Elements per rank: the bucket padded to a multiple of the world size, divided by it.
    pub(super) chunk: usize,
    /// Where this bucket's chunk sits in every rank's shard.
    pub(super) shard_offset: usize,
}

/// Name of the shard optimizer's parameter for bucket `b` (ZeRO-2).
pub(super) fn bucket_param(b: usize) -> String {
    format!("zero2.bucket{b}")
}

impl Bucket {
    /// This rank's chunk of the bucket in a shard-long vector (a view).
    pub(super) fn mine(&self, shard: &Tensor) -> Tensor {
        shard.narrow(0, self.shard_offset as i64, self.chunk as i64)
    }

    /// Flat `[chunk · world]` f32 vector of the bucket's pieces of `tensors` (one per
    /// parameter, each flattened; an undefined one counts as zeros).
    pub(super) fn flatten(&self, tensors: &[Tensor], world: usize, device: Device) -> Tensor {
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
    pub(super) fn unflatten(
        &self,
        flat: &Tensor,
        tensors: &[Tensor],
        keep: impl Fn(usize) -> bool,
    ) {
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
pub(super) fn plan_buckets(
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
pub(super) struct GradShard {
    /// The model's parameters (shallow clones), in the optimizer's order.
    pub(super) params: Vec<Tensor>,
    pub(super) names: Vec<String>,
    /// Parameter index by data pointer: how a handed-over gradient finds its parameter.
    pub(super) index: HashMap<usize, usize>,
    pub(super) buckets: Vec<Bucket>,
    /// Per parameter, the buckets holding its elements.
    pub(super) buckets_of: Vec<Vec<usize>>,
    /// The f32 shard the optimizer updates (shared with the shard optimizer).
    pub(super) values: Tensor,
    /// This rank's f32 gradient shard: the sum over ranks and micro-batches so far.
    pub(super) grad: Tensor,
    /// Which parameters got a gradient on this rank since the last `zero_grad`.
    pub(super) touched: Vec<bool>,
    /// Whether `values` persists between steps as master weights.
    pub(super) master: bool,
}

/// The data pointer of `t`, which identifies a parameter across shallow clones.
pub(super) fn address(t: &Tensor) -> usize {
    t.data_ptr() as usize
}

/// Where a ZeRO-2 rank's backward pass hands its gradients (see [`GradSink`]): each call's
/// gradients are reduce-scattered bucket by bucket into the rank's gradient shard, then
/// dropped. Every rank must hand over the same stages in the same order. The first error
/// stops the communication and is returned by [`ShardedGradSink::finish`].
pub struct ShardedGradSink<'a> {
    pub(super) comm: &'a mut dyn Collective,
    pub(super) shard: &'a mut GradShard,
    /// ZeRO-3: the model's parameter shard, which each stage is gathered from.
    pub(super) params: Option<&'a mut ParamShard>,
    /// ZeRO-3: the communication thread that gathers the next stage ahead.
    pub(super) prefetch: Option<&'a CommThread>,
    pub(super) device: Device,
    pub(super) error: Option<LearnerError>,
}

impl ShardedGradSink<'_> {
    /// Ends the backward pass: its first error, if any.
    pub fn finish(self) -> Result<()> {
        let drained = self.params.map_or(Ok(()), ParamShard::drain);
        self.error.map_or(drained, Err)
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

impl ParamGather for ShardedGradSink<'_> {
    fn gather(&mut self, stage: Stage, next: Option<Stage>) {
        if let (Some(params), None) = (self.params.as_deref_mut(), &self.error) {
            let index = Some(&mut self.shard.index);
            let result = params.gather(&mut *self.comm, self.prefetch, (stage, next), index);
            self.error = result.err();
        }
    }

    fn release(&mut self, stage: Stage) {
        if let Some(params) = self.params.as_deref_mut() {
            params.release(stage, Some(&mut self.shard.index));
        }
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

/// The pieces of optimizer state a gather moves: both moments (`moment`), and the master
/// weights (`masters`) when they are kept.
fn state_pieces<P>(
    master: bool,
    moment: impl Fn(StatePart) -> P,
    masters: impl FnOnce() -> P,
) -> Vec<(StatePart, P)> {
    let mut pieces: Vec<(StatePart, P)> = [StatePart::ExpAvg, StatePart::ExpAvgSq]
        .into_iter()
        .map(|part| (part, moment(part)))
        .collect();
    if master {
        pieces.push((StatePart::Master, masters()));
    }
    pieces
}

/// The names of `optimizer`'s parameters and the parameters themselves (shallow clones).
fn names_and_params(optimizer: &AdamW) -> (Vec<String>, Vec<Tensor>) {
    optimizer
        .params()
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .unzip()
}

/// Name of the one parameter of a shard optimizer.
pub(super) const SHARD_PARAM: &str = "zero1.shard";

impl DataParallel {
    /// Replaces the model's optimizer by one over this rank's shard, moments (and master
    /// weights) taken from rank 0's full optimizer (`origin`); moments rank 0 never
    /// allocated stay unallocated until the first step.
    pub(super) fn shard_optimizer(
        &mut self,
        models: &mut PrimeModels,
        which: Trained,
        origin: &Origin,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let full = Self::optimizer_of(models, which);
        let (names, params) = names_and_params(full);
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
    pub(super) fn zero1_slice(
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
    pub(super) fn shard_gradients(
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
        let (names, params) = names_and_params(full);
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
    pub(super) fn zero2_shard(
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
    pub(super) fn bucket_elements(&self) -> usize {
        (self.config.bucket_mb.max(1) << 20) / 4
    }

    /// ZeRO-2: the sink the backward passes of `which` hand their gradients to (one per
    /// pass; call [`ShardedGradSink::finish`] after it). `None` without gradient sharding.
    pub fn grad_sink(&mut self, which: Trained) -> Option<ShardedGradSink<'_>> {
        let shard = self.grad_shards[which as usize].as_mut()?;
        Some(ShardedGradSink {
            comm: &mut *self.comm,
            shard,
            params: self.param_shards[Role::from(which) as usize].as_mut(),
            prefetch: self.prefetch.as_deref(),
            device: self.device,
            error: None,
        })
    }

    /// ZeRO-2 and ZeRO-3: takes part in one backward pass of `model` (the model `which`)
    /// without rows ([`Qwen2::idle_backward_to`]), so that this rank joins the gathers and
    /// reduce-scatters of ranks that have one more micro-batch than it.
    pub fn idle_backward(&mut self, model: &Qwen2, which: Trained) -> Result<()> {
        let Some(mut sink) = self.grad_sink(which) else {
            return Ok(());
        };
        model.idle_backward_to(&mut sink);
        sink.finish()
    }

    /// ZeRO-2's update: the gradient shard is already reduced; the global norm comes from
    /// every shard's sum of squares, AdamW updates the shard, and each bucket of updated
    /// values is all-gathered back into the parameters. With ZeRO-3 the updated values go
    /// into the rank's parameter shard instead, and nothing is gathered.
    pub(super) fn update_zero2(
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
        let param_shard = self.param_shards[Role::from(which) as usize].as_ref();
        if !shard.master {
            match param_shard {
                Some(params) => params.read_values(&shard.values),
                None => {
                    for b in &shard.buckets {
                        let n = b.chunk as i64;
                        let flat = b.flatten(&shard.params, world, device);
                        b.mine(&shard.values)
                            .copy_(&flat.narrow(0, rank as i64 * n, n));
                    }
                }
            }
        }
        let untouched: Vec<usize> = (0..anywhere.len())
            .filter(|&p| anywhere[p] == 0.0)
            .collect();
        let kept = param_shard.map(|params| params.values_of(&untouched));
        let grads: Vec<Tensor> = shard.buckets.iter().map(|b| b.mine(&shard.grad)).collect();
        Self::optimizer_of(models, which).step_with_grads(lr, &grads);
        if let (Some(params), Some(kept)) = (param_shard, kept) {
            params.write_values(&shard.values, &kept);
            return Ok(norm);
        }
        for b in &shard.buckets {
            let mut flat = Tensor::zeros([(b.chunk * world) as i64], (Kind::Float, device));
            self.comm
                .all_gather(&b.mine(&shard.values), &mut flat)
                .map_err(comm_err)?;
            b.unflatten(&flat, &shard.params, |p| anywhere[p] > 0.0);
        }
        Ok(norm)
    }

    pub(super) fn update_sharded(
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
    pub(super) fn gather(
        &mut self,
        optimizer: &AdamW,
        which: Trained,
        keep: bool,
    ) -> Result<Option<AdamW>> {
        let _guard = tch::no_grad_guard();
        let device = self.device;
        if let Some(shard) = self.grad_shards[which as usize].take() {
            // ZeRO-2: this rank's chunk of every bucket, all-gathered bucket by bucket.
            let pieces = state_pieces(
                shard.master,
                |part| {
                    let chunk = |(b, bucket): (usize, &Bucket)| {
                        optimizer.held(b, part).unwrap_or_else(|| {
                            Tensor::zeros([bucket.chunk as i64], (Kind::Float, device))
                        })
                    };
                    shard.buckets.iter().enumerate().map(chunk).collect()
                },
                || {
                    shard
                        .buckets
                        .iter()
                        .map(|b| b.mine(&shard.values))
                        .collect()
                },
            );
            let rebuilt = self.gather_pieces(
                (&shard.names, &shard.params, shard.master),
                optimizer,
                keep,
                pieces,
                |dp, chunks: &Vec<Tensor>, whole| dp.all_gather_buckets(&shard, chunks, whole),
            );
            self.grad_shards[which as usize] = Some(shard);
            return rebuilt;
        }
        if let Some(shard) = self.shards[which as usize].take() {
            // ZeRO-1: each rank's contiguous shard, all-gathered a bucket's worth at a time.
            let len = shard.len as i64;
            let pieces = state_pieces(
                shard.master,
                |part| {
                    optimizer
                        .held(0, part)
                        .unwrap_or_else(|| Tensor::zeros([len], (Kind::Float, device)))
                },
                || shard.values.shallow_clone(),
            );
            let rebuilt = self.gather_pieces(
                (&shard.names, &shard.params, shard.master),
                optimizer,
                keep,
                pieces,
                |dp, mine: &Tensor, whole| dp.all_gather_shard(&shard, mine, whole),
            );
            self.shards[which as usize] = Some(shard);
            return rebuilt;
        }
        Ok(None)
    }

    /// The frame the ZeRO gathers share: each piece of optimizer state (`pieces`, this
    /// rank's part of it) is all-gathered by `gather_piece` into `whole` (host tensors of the
    /// parameters' shapes; none when not `keep`), and with `keep` the gathered state becomes
    /// an unsharded optimizer over the parameters (`names`, `params`, whether masters are kept).
    fn gather_pieces<P>(
        &mut self,
        (names, params, master): (&[String], &[Tensor], bool),
        optimizer: &AdamW,
        keep: bool,
        pieces: Vec<(StatePart, P)>,
        mut gather_piece: impl FnMut(&mut Self, &P, &[Tensor]) -> Result<()>,
    ) -> Result<Option<AdamW>> {
        let mut full_state = std::collections::BTreeMap::new();
        for (part, mine) in pieces {
            let whole = if keep { host_zeros(params) } else { Vec::new() };
            gather_piece(self, &mine, &whole)?;
            for (name, t) in names.iter().zip(whole) {
                full_state.insert(format!("{name}.{}", part.suffix()), t);
            }
        }
        if !keep {
            return Ok(None);
        }
        full_adamw(names, params, master, optimizer, &full_state).map(Some)
    }

    /// ZeRO-1: all-gathers `mine`, this rank's contiguous shard of one piece of state, a
    /// bucket's worth at a time, writing the pieces into `whole` (when not empty).
    fn all_gather_shard(&mut self, shard: &Shard, mine: &Tensor, whole: &[Tensor]) -> Result<()> {
        let world = self.world_size();
        // Elements of each rank's shard per round: a bucket in all.
        let window = self.bucket_elements().div_ceil(world).max(1);
        let mut at = 0;
        while at < shard.len {
            let n = window.min(shard.len - at);
            let mut flat = Tensor::zeros([(n * world) as i64], (Kind::Float, self.device));
            self.comm
                .all_gather(&mine.narrow(0, at as i64, n as i64), &mut flat)
                .map_err(comm_err)?;
            for r in (0..world).filter(|_| !whole.is_empty()) {
                let piece = flat.narrow(0, (r * n) as i64, n as i64);
                write_flat(whole, &shard.layout.sizes, r * shard.len + at, &piece);
            }
            at += n;
        }
        Ok(())
    }

    /// ZeRO-2: all-gathers this rank's chunk of every bucket (`chunks`) of one piece of
    /// state, unflattening each bucket into `whole` (when not empty).
    fn all_gather_buckets(
        &mut self,
        shard: &GradShard,
        chunks: &[Tensor],
        whole: &[Tensor],
    ) -> Result<()> {
        let world = self.world_size();
        for (bucket, mine) in shard.buckets.iter().zip(chunks) {
            let size = (bucket.chunk * world) as i64;
            let mut flat = Tensor::zeros([size], (Kind::Float, self.device));
            self.comm.all_gather(mine, &mut flat).map_err(comm_err)?;
            if !whole.is_empty() {
                bucket.unflatten(&flat, whole, |_| true);
            }
        }
        Ok(())
    }
}

/// The unsharded optimizer over the parameters `params` named `names`, with the gathered
/// `state` (on the host, where it stays until a step needs it) and the configuration and step
/// count of `shard_optimizer`, this rank's shard of it.
pub(super) fn full_adamw(
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
}
