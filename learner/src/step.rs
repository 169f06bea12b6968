//! One PRIME iteration on a batch of scored groups (paper Algorithm 1 lines 6-10, spec §1
//! steps 2-6), read top to bottom:
//!
//! 1. old log-probs of the policy, recomputed here rather than taken from the sampler (§1.2);
//! 2. reference log-probs: the frozen SFT copy, or the old policy itself (§2.3);
//! 3. the PRM pass, mini-batch by mini-batch: forward with gradients, token log-ratios, the
//!    cross-entropy loss, an optimizer step; the rewards come from that same forward, before
//!    its update ("single-forward", §3.3), or from a second forward after every update;
//! 4. process rewards, their normalisation and the RLOO advantages (§2.2, §2.5, §4);
//! 5. the PPO pass over the same mini-batches (§6).
//!
//! Model passes per step: PRIME with a frozen reference makes 3 forwards without gradients
//! (old log-probs, reference, and after the PRM's updates only under `update_then_score`) and
//! 2 with (PRM, policy); the new-batch PRM figures come from the PRM's training forward, not
//! an extra pass. The outcome-only baseline (`rloo`) makes 1 and 1.
//!
//! Mini-batches hold whole groups in batch order; micro-batches inside them are sized by a
//! token budget and their gradients accumulate so that the loss equals the mini-batch loss.
use std::time::Instant;

use prime_algo::{
    advantages, implicit_prm, masks, ppo, Estimator, LossAggregation, OffPolicyCorrection,
    PrmUpdate, ReferenceType,
};
use prime_model::logprobs::PaddedBatch;
use prime_model::training::{GradSink, ParamGather, WholeParams};
use prime_model::CausalLm;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::batch::{ScoredGroup, StepBatch};
use crate::config::{LearnerConfig, MemoryConfig};
use crate::error::{LearnerError, Result};
use crate::models::PrimeModels;
use crate::parallel::{DataParallel, Role, Trained};

/// What one step measured. Rewards are per response; losses are means over mini-batches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Groups trained on.
    pub groups: usize,
    /// Responses trained on.
    pub responses: usize,
    /// Valid response tokens (the mask of spec §0).
    pub response_tokens: i64,
    /// Prompt plus response tokens forwarded per model pass.
    pub total_tokens: i64,
    /// Mean valid response length.
    pub response_length_mean: f64,
    /// Mean outcome score.
    pub score_mean: f64,
    /// Standard deviation of the outcome scores.
    pub score_std: f64,
    /// Mean implicit sequence reward `β Σ_t q_t`, as used for the rewards.
    pub prm_reward_mean: f64,
    /// Its standard deviation over responses.
    pub prm_reward_std: f64,
    /// PRM cross-entropy, each mini-batch measured before its own update.
    pub prm_loss: f64,
    /// PRM cross-entropy on the new batch, each mini-batch measured by the forward that
    /// trains it, before its own update (the first before any update on the batch): how well
    /// the PRM generalises to responses it has not trained on (0.693 = chance).
    pub prm_new_batch_loss: f64,
    /// `dpo_acc` of the PRM on the new batch, measured the same way (0.5 = chance).
    pub prm_new_batch_accuracy: f64,
    /// The PRM's ranking within groups on the new batch, measured the same way: the share of
    /// (correct, wrong) pairs of a group whose summed implicit rewards put the correct one
    /// above, ties half, averaged over the groups that hold both (0.5 = chance); `None` for
    /// the outcome-only baseline or a batch without such a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prm_new_batch_ranking: Option<f64>,
    /// `dpo_acc` (spec §3.5) of the rewards the advantages used.
    pub prm_accuracy: f64,
    /// `dpo_acc_abs` of the same rewards.
    pub prm_abs_accuracy: f64,
    /// PRM gradient norm before clipping, mean over mini-batches.
    pub prm_grad_norm: f64,
    /// Mean absolute normalised process reward per valid token.
    pub process_reward_abs_mean: f64,
    /// Mean return over valid tokens, before whitening.
    pub return_mean: f64,
    /// Clipped surrogate loss, mean over mini-batches.
    pub policy_loss: f64,
    /// Share of tokens whose ratio was clipped.
    pub clip_fraction: f64,
    /// First-order KL between the old and the updated policy during the PPO pass.
    pub approx_kl: f64,
    /// Token entropy of the policy on the batch, before the update.
    pub entropy: f64,
    /// Mean |old log-prob − sampler log-prob| over valid tokens, when the sampler's were
    /// given: near 0 when sampler and learner agree (same weights, same temperature).
    pub sampler_logprob_gap: Option<f64>,
    /// Policy gradient norm before clipping, mean over mini-batches.
    pub policy_grad_norm: f64,
    /// Mean decoupled-PPO behaviour weight `π_old/π_behav` over valid tokens, when the step
    /// corrected for off-policy groups (`max_staleness >= 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior_weight_mean: Option<f64>,
    /// Share of valid tokens whose behaviour weight was truncated at the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior_weight_truncated: Option<f64>,
    /// Learning rates used.
    pub policy_lr: f64,
    /// PRM learning rate used.
    pub prm_lr: f64,
    /// Seconds recomputing the old log-probs (and entropies).
    pub time_old_logprobs_s: f64,
    /// Seconds in the reference forward.
    pub time_reference_s: f64,
    /// Seconds in the PRM pass (forward, backward, updates).
    pub time_prm_s: f64,
    /// Seconds computing advantages.
    pub time_advantages_s: f64,
    /// Seconds in the PPO pass.
    pub time_policy_s: f64,
}

/// Response-aligned log-probs `[n, R]` of `rows` under `model` (0 off the response), and
/// with `want_entropy` the token entropies. Runs with or without gradients as the caller's
/// grad mode says.
fn response_logprobs(
    model: &CausalLm,
    batch: &StepBatch,
    rows: &std::ops::Range<usize>,
    chunk_tokens: i64,
    want_entropy: bool,
    params: &mut dyn ParamGather,
) -> Result<(Tensor, Option<Tensor>)> {
    let padded = batch.padded(rows, model)?;
    let (logprobs, entropy) = model.model.forward_right_padded_with(
        &padded.input_ids,
        &padded.position_ids(),
        params,
        |hidden| {
            response_head(
                model,
                batch,
                rows,
                &padded,
                hidden,
                chunk_tokens,
                want_entropy,
            )
        },
    );
    let valid = masks_f32(&batch.rows_of(&batch.mask, rows));
    let logprobs = logprobs * &valid;
    let entropy = entropy.map(|h| h * &valid);
    Ok((logprobs, entropy))
}

/// The response-aligned log-probs (and entropies) of [`response_logprobs`] from the final
/// hidden states `hidden` of `padded`, the vocabulary projection `chunk_tokens` positions at
/// a time; padding is not masked yet.
fn response_head(
    model: &CausalLm,
    batch: &StepBatch,
    rows: &std::ops::Range<usize>,
    padded: &PaddedBatch,
    hidden: &Tensor,
    chunk_tokens: i64,
    want_entropy: bool,
) -> (Tensor, Option<Tensor>) {
    let qwen = &model.model;
    let device = qwen.device();
    let width = batch.response_width;
    let index = response_positions(batch, rows, hidden.size()[1] - 1, device);
    let targets =
        padded
            .input_ids
            .pad([0, 1], "constant", Some(0.0))
            .gather(1, &(&index + 1), false);
    let (hidden_size, n) = (hidden.size()[2], rows.len() as i64);
    let gathered = hidden.gather(
        1,
        &index.unsqueeze(-1).expand([n, width, hidden_size], false),
        false,
    );
    let chunk = chunk_tokens.max(1);
    let mut logprobs = Vec::new();
    let mut entropies = Vec::new();
    for start in (0..width).step_by(chunk as usize) {
        let len = chunk.min(width - start);
        let log_probs = qwen
            .logits(&gathered.narrow(1, start, len))
            .log_softmax(-1, Kind::Float);
        let target = targets.narrow(1, start, len).unsqueeze(-1);
        logprobs.push(log_probs.gather(-1, &target, false).squeeze_dim(-1));
        if want_entropy {
            entropies.push(-(log_probs.exp() * &log_probs).sum_dim_intlist(-1, false, Kind::Float));
        }
    }
    let logprobs = Tensor::cat(&logprobs, 1);
    let entropy = want_entropy.then(|| Tensor::cat(&entropies, 1));
    (logprobs, entropy)
}

/// `[n, R]` indices into a row's positions: response token j of a row with prompt length P
/// is predicted at position P + j − 1 (clamped to `last` on padding).
fn response_positions(
    batch: &StepBatch,
    rows: &std::ops::Range<usize>,
    last: i64,
    device: Device,
) -> Tensor {
    let starts = Tensor::from_slice(&batch.prompt_lengths[rows.clone()]).to_device(device) - 1;
    (starts.unsqueeze(1) + Tensor::arange(batch.response_width, (Kind::Int64, device)).unsqueeze(0))
        .clamp_max(last)
}

/// Forward with gradients on `rows`, `loss_fn(logprobs, entropy)` on the response-aligned
/// log-probs, backward. With `recompute` the decoder layers are recomputed during the
/// backward pass (activation checkpointing; same gradients, less memory); entropies are then
/// not available. With a `sink` (ZeRO-2) the parameter gradients go to it layer by layer
/// instead of into `.grad`, which needs recomputation. Returns the detached loss.
fn backward_micro(
    model: &CausalLm,
    batch: &StepBatch,
    rows: &std::ops::Range<usize>,
    memory: &MemoryConfig,
    want_entropy: bool,
    sink: Option<&mut dyn GradSink>,
    loss_fn: impl FnOnce(&Tensor, Option<&Tensor>) -> Tensor,
) -> Result<Tensor> {
    if sink.is_some() && !memory.recompute_activations {
        return Err(zero2_needs_recompute());
    }
    if !memory.recompute_activations {
        let (logprobs, entropy) = response_logprobs(
            model,
            batch,
            rows,
            memory.logit_chunk_tokens,
            want_entropy,
            &mut WholeParams,
        )?;
        let loss = loss_fn(&logprobs, entropy.as_ref());
        loss.backward();
        return Ok(loss.detach());
    }
    if want_entropy {
        return Err(LearnerError::Data(
            "recompute_activations does not support entropy_coeff != 0 yet".into(),
        ));
    }
    let device = model.model.device();
    let padded = batch.padded(rows, model)?;
    let last = padded.input_ids.size()[1] - 2;
    let index = response_positions(batch, rows, last, device);
    let valid = masks_f32(&batch.rows_of(&batch.mask, rows));
    let loss = |sequence_logprobs: &Tensor| {
        loss_fn(&(sequence_logprobs.gather(1, &index, false) * &valid), None)
    };
    let qwen = &model.model;
    let chunk = memory.logit_chunk_tokens;
    let result = match sink {
        Some(sink) => qwen.token_logprobs_backward_to(&padded, chunk, sink, loss),
        None => qwen.token_logprobs_backward(&padded, chunk, true, loss),
    };
    Ok(result.loss)
}

/// The refusal of `learner.parallel.zero2` without recomputation.
fn zero2_needs_recompute() -> LearnerError {
    LearnerError::Config {
        path: "learner.parallel.zero2".into(),
        message: "gradient sharding hands gradients over layer by layer from the recomputing \
                  backward pass: it needs learner.memory.recompute_activations = true"
            .into(),
    }
}

/// One micro-batch's backward pass on this rank: with ZeRO-2 through a gradient sink that
/// reduce-scatters each layer's gradients, otherwise into `.grad`.
#[allow(clippy::too_many_arguments)]
fn rank_backward(
    dp: &mut DataParallel,
    which: Trained,
    model: &CausalLm,
    batch: &StepBatch,
    rows: &std::ops::Range<usize>,
    memory: &MemoryConfig,
    want_entropy: bool,
    loss_fn: impl FnOnce(&Tensor, Option<&Tensor>) -> Tensor,
) -> Result<Tensor> {
    let Some(mut sink) = dp.grad_sink(which) else {
        return backward_micro(model, batch, rows, memory, want_entropy, None, loss_fn);
    };
    let loss = backward_micro(
        model,
        batch,
        rows,
        memory,
        want_entropy,
        Some(&mut sink),
        loss_fn,
    );
    // A communication error explains a failed pass better than what followed from it.
    sink.finish()?;
    loss
}

/// The micro-batches of `mini` this rank runs. With ZeRO-2 every backward pass reduces its
/// gradients over all ranks (and with ZeRO-3 every pass gathers the parameters), so when
/// `in_step` a rank with fewer micro-batches than the busiest one (or no rows) also returns
/// how many passes without rows it must add ([`DataParallel::idle_backward`],
/// [`DataParallel::idle_forward`]).
fn rank_micro_batches(
    dp: &DataParallel,
    batch: &StepBatch,
    mini: &std::ops::Range<usize>,
    memory: &MemoryConfig,
    in_step: bool,
) -> (Vec<std::ops::Range<usize>>, usize) {
    let budget = memory.micro_batch_tokens;
    let mine = batch.micro_batches(dp.my_rows(mini, batch.k), budget);
    if !in_step {
        return (mine, 0);
    }
    let most = (0..dp.world_size())
        .map(|r| {
            let rows = dp.rows_of_rank(mini, batch.k, r);
            batch.micro_batches(rows, budget).len()
        })
        .max()
        .unwrap_or(0);
    let idle = most - mine.len();
    (mine, idle)
}

fn masks_f32(mask: &Tensor) -> Tensor {
    mask.to_kind(Kind::Float)
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

/// Log-probs of every row without gradients, micro-batched; with `want_entropy` also the
/// mean token entropy. Each rank computes its share of the rows; all get every row.
fn frozen_logprobs(
    (model, role): (&CausalLm, Role),
    batch: &StepBatch,
    memory: &MemoryConfig,
    want_entropy: bool,
    dp: &mut DataParallel,
) -> Result<(Tensor, Option<f64>)> {
    let _guard = tch::no_grad_guard();
    let mut pieces = Vec::new();
    let mut entropy_sum = 0.0;
    let all = 0..batch.rows();
    let (micros, idle) = rank_micro_batches(dp, batch, &all, memory, dp.zero3());
    for rows in micros {
        let chunk = memory.logit_chunk_tokens;
        let (logprobs, entropy) = match dp.param_gather(role) {
            Some(mut params) => {
                let result =
                    response_logprobs(model, batch, &rows, chunk, want_entropy, &mut params);
                params.finish()?;
                result?
            }
            None => response_logprobs(model, batch, &rows, chunk, want_entropy, &mut WholeParams)?,
        };
        if let Some(h) = entropy {
            entropy_sum += scalar(&h.sum(Kind::Double));
        }
        pieces.push(logprobs);
    }
    for _ in 0..idle {
        dp.idle_forward(&model.model, role)?;
    }
    let tokens = scalar(&batch.mask.to_kind(Kind::Double).sum(Kind::Double));
    let mut sums = [entropy_sum];
    dp.sum(&mut sums)?;
    let local = rows_or_empty(pieces, batch, model.model.device());
    Ok((
        dp.gather_rows(&local, &all, batch.k)?,
        want_entropy.then(|| sums[0] / tokens.max(1.0)),
    ))
}

/// The concatenated `[n, R]` pieces, or `[0, R]` for a rank without rows.
fn rows_or_empty(pieces: Vec<Tensor>, batch: &StepBatch, device: Device) -> Tensor {
    if pieces.is_empty() {
        Tensor::zeros([0, batch.response_width], (Kind::Float, device))
    } else {
        Tensor::cat(&pieces, 0)
    }
}

/// The weight of a micro-batch's aggregated loss in its mini-batch, so that accumulated
/// gradients equal those of the mini-batch loss: its share of sequences, or of valid tokens
/// for a token mean.
fn micro_weight(
    batch: &StepBatch,
    micro: &std::ops::Range<usize>,
    mini: &std::ops::Range<usize>,
    aggregation: LossAggregation,
) -> f64 {
    match aggregation {
        LossAggregation::SeqMeanTokenMean => micro.len() as f64 / mini.len() as f64,
        LossAggregation::TokenMean => {
            let tokens = |r: &std::ops::Range<usize>| {
                scalar(
                    &batch
                        .rows_of(&batch.mask, r)
                        .to_kind(Kind::Double)
                        .sum(Kind::Double),
                )
            };
            tokens(micro) / tokens(mini).max(1.0)
        }
    }
}

/// What the PRM pass leaves.
struct PrmPass {
    /// Token log-ratios `[N, R]` the rewards use.
    q: Tensor,
    /// Token log-ratios `[N, R]` from the forward that trained each mini-batch, before its
    /// update: the new-batch figures (equal to `q` under `score_then_update`).
    q_before_update: Tensor,
    /// Mean CE loss over mini-batches.
    loss: f64,
    /// Mean gradient norm over mini-batches.
    grad_norm: f64,
}

/// The PRM pass (spec §3): per mini-batch, forward with gradients, the CE loss, an update.
fn prm_pass(
    models: &mut PrimeModels,
    dp: &mut DataParallel,
    batch: &StepBatch,
    reference_logprobs: &Tensor,
    config: &LearnerConfig,
    lr: f64,
) -> Result<PrmPass> {
    let beta = config.algo.prm.beta;
    let minis = batch.mini_batches(config.algo.mini_batches);
    let mut q_rows = Vec::new();
    let (mut loss_sum, mut norm_sum) = (0.0, 0.0);
    for mini in &minis {
        dp.zero_grad(models, Trained::Prm);
        let mut q_mine = Vec::new();
        let (micros, idle) = rank_micro_batches(dp, batch, mini, &config.memory, dp.zero2());
        // Weights stay shares of the whole mini-batch, so the ranks' gradients sum to it.
        for micro in micros {
            let mask = batch.rows_of(&batch.mask, &micro);
            let reference = batch.rows_of(reference_logprobs, &micro);
            let scores = batch.rows_of(&batch.scores, &micro);
            let weight = micro.len() as f64 / mini.len() as f64;
            let mut q_micro = None;
            let loss = rank_backward(
                dp,
                Trained::Prm,
                &models.prm,
                batch,
                &micro,
                &config.memory,
                false,
                |logprobs, _| {
                    let q = implicit_prm::token_log_ratio(logprobs, &reference, &mask);
                    let loss = implicit_prm::prm_ce_loss(&q, &mask, &scores, beta) * weight;
                    q_micro = Some(q.detach());
                    loss
                },
            )?;
            loss_sum += scalar(&loss);
            q_mine.push(q_micro.expect("the loss function ran"));
        }
        for _ in 0..idle {
            dp.idle_backward(&models.prm.model, Trained::Prm)?;
        }
        let local = rows_or_empty(q_mine, batch, models.prm.model.device());
        q_rows.push(dp.gather_rows(&local, mini, batch.k)?);
        norm_sum += dp.update(models, Trained::Prm, config.prm_optimizer.max_grad_norm, lr)?;
    }
    let q_before_update = Tensor::cat(&q_rows, 0);
    let q = if config.algo.prm_update == PrmUpdate::UpdateThenScore {
        // Forward 5 (update_then_score only): the rewards come from the PRM after all of
        // this batch's updates (spec §3.3), which no earlier pass has seen.
        let _guard = tch::no_grad_guard();
        let (logprobs, _) =
            frozen_logprobs((&models.prm, Role::Prm), batch, &config.memory, false, dp)?;
        implicit_prm::token_log_ratio(&logprobs, reference_logprobs, &batch.mask)
    } else {
        q_before_update.shallow_clone()
    };
    let mut losses = [loss_sum];
    dp.sum(&mut losses)?;
    let count = minis.len() as f64;
    Ok(PrmPass {
        q,
        q_before_update,
        loss: losses[0] / count,
        grad_norm: norm_sum / count,
    })
}

/// Figures of the PPO pass, means over mini-batches.
struct PolicyPass {
    loss: f64,
    clip_fraction: f64,
    approx_kl: f64,
    grad_norm: f64,
}

/// The PPO pass (spec §6): per mini-batch, the clipped surrogate accumulated over
/// micro-batches, clipping and an update.
#[allow(clippy::too_many_arguments)]
fn policy_pass(
    models: &mut PrimeModels,
    dp: &mut DataParallel,
    batch: &StepBatch,
    old_logprobs: &Tensor,
    reference_logprobs: &Tensor,
    advantages: &Tensor,
    behavior_weights: Option<&Tensor>,
    config: &LearnerConfig,
    lr: f64,
) -> Result<PolicyPass> {
    let ppo_config = &config.algo.ppo;
    let aggregation = ppo_config.loss_aggregation;
    let minis = batch.mini_batches(config.algo.mini_batches);
    let mut totals = [0.0f64; 4];
    for mini in &minis {
        dp.zero_grad(models, Trained::Policy);
        let (micros, idle) = rank_micro_batches(dp, batch, mini, &config.memory, dp.zero2());
        for micro in micros {
            let reference =
                (ppo_config.kl_coeff != 0.0).then(|| batch.rows_of(reference_logprobs, &micro));
            let old = batch.rows_of(old_logprobs, &micro);
            let weights = behavior_weights.map(|w| batch.rows_of(w, &micro));
            let micro_advantages = batch.rows_of(advantages, &micro);
            let mask = batch.rows_of(&batch.mask, &micro);
            let weight = micro_weight(batch, &micro, mini, aggregation);
            let mut figures = None;
            let _loss = rank_backward(
                dp,
                Trained::Policy,
                &models.policy,
                batch,
                &micro,
                &config.memory,
                ppo_config.entropy_coeff != 0.0,
                |logprobs, entropy| {
                    let loss = ppo::policy_loss(
                        logprobs,
                        &old,
                        &micro_advantages,
                        &mask,
                        entropy,
                        reference.as_ref(),
                        weights.as_ref(),
                        ppo_config,
                    );
                    let s = &loss.surrogate;
                    figures = Some([&s.loss, &s.clip_fraction, &s.approx_kl].map(scalar));
                    &loss.loss * weight
                },
            )?;
            let figures = figures.expect("the loss function ran");
            for (total, value) in totals.iter_mut().zip(figures) {
                *total += value * weight;
            }
        }
        for _ in 0..idle {
            dp.idle_backward(&models.policy.model, Trained::Policy)?;
        }
        totals[3] += dp.update(
            models,
            Trained::Policy,
            config.policy_optimizer.max_grad_norm,
            lr,
        )?;
    }
    dp.sum(&mut totals[..3])?;
    let count = minis.len() as f64;
    Ok(PolicyPass {
        loss: totals[0] / count,
        clip_fraction: totals[1] / count,
        approx_kl: totals[2] / count,
        grad_norm: totals[3] / count,
    })
}

/// Mean and (population) standard deviation.
fn mean_std(t: &Tensor) -> (f64, f64) {
    let t = t.to_kind(Kind::Double);
    (scalar(&t.mean(Kind::Double)), scalar(&t.std(false)))
}

/// One PRIME iteration (spec §1 steps 2-6) on `groups`, every one of which is trained on.
/// `iteration` (0-based) drives the learning-rate warm-up. The `rloo` estimator needs no
/// process rewards and leaves the PRM untouched. `dp` is this rank's data-parallel group
/// ([`DataParallel::single`] alone): every rank calls it with the same groups and takes its
/// share (see [`crate::parallel`]).
pub fn prime_step(
    models: &mut PrimeModels,
    dp: &mut DataParallel,
    groups: &[ScoredGroup],
    config: &LearnerConfig,
    iteration: u64,
) -> Result<StepMetrics> {
    let _span = tracing::info_span!(
        "prime_step",
        iteration,
        groups = groups.len(),
        rank = dp.rank()
    )
    .entered();
    let policy = &models.policy;
    let batch = StepBatch::new(
        groups,
        &policy.eos_token_ids(),
        policy.config.vocab_size,
        policy.model.device(),
    )?;
    let k = batch.k as i64;
    let mut metrics = StepMetrics {
        groups: groups.len(),
        responses: batch.rows(),
        ..StepMetrics::default()
    };

    // 1. Old log-probs (spec §1 step 2), with the policy's entropy for monitoring.
    // Forward 1 (no grad): the PPO ratio's denominator under the learner's own numerics (the
    // sampler's log-probs differ by kernels and dtype; §1.2), and the reference when
    // `reference = "policy"`.
    let clock = Instant::now();
    let (old_logprobs, entropy) =
        frozen_logprobs((policy, Role::Policy), &batch, &config.memory, true, dp)?;
    metrics.entropy = entropy.unwrap_or_default();
    metrics.sampler_logprob_gap = batch.sampling_logprobs.as_ref().map(|sampled| {
        scalar(&masks::masked_mean(
            &(&old_logprobs - sampled).abs(),
            &batch.mask,
        ))
    });
    metrics.time_old_logprobs_s = clock.elapsed().as_secs_f64();

    // 2. Reference log-probs (spec §2.3).
    let clock = Instant::now();
    let needs_reference =
        config.algo.estimator == Estimator::Prime || config.algo.ppo.kl_coeff != 0.0;
    let reference_logprobs = match (&models.reference, config.algo.reference) {
        // Forward 2 (no grad, PRIME or a KL term only): the frozen reference's log-probs,
        // the denominator of the implicit reward's log-ratio (§2.3).
        (Some(reference), ReferenceType::Freeze) if needs_reference => {
            frozen_logprobs(
                (reference, Role::Reference),
                &batch,
                &config.memory,
                false,
                dp,
            )?
            .0
        }
        (None, ReferenceType::Freeze) if needs_reference => {
            return Err(LearnerError::Config {
                path: "learner".into(),
                message: "reference = \"freeze\" needs a reference model".into(),
            })
        }
        _ => old_logprobs.shallow_clone(),
    };
    metrics.time_reference_s = clock.elapsed().as_secs_f64();

    // 3. PRM pass (spec §3), skipped by the outcome-only baseline.
    let clock = Instant::now();
    let prm_lr = config.prm_optimizer.lr_at(iteration);
    let q = match config.algo.estimator {
        Estimator::Prime => {
            // Forward 3 (with its backward, per mini-batch): trains the PRM; its log-ratios,
            // taken before each mini-batch's update, are the new-batch figures and (under
            // score_then_update) the rewards. No separate scoring pass.
            let pass = prm_pass(models, dp, &batch, &reference_logprobs, config, prm_lr)?;
            metrics.prm_new_batch_loss = scalar(&implicit_prm::prm_ce_loss(
                &pass.q_before_update,
                &batch.mask,
                &batch.scores,
                config.algo.prm.beta,
            ));
            metrics.prm_new_batch_accuracy = scalar(&implicit_prm::dpo_accuracy(
                &pass.q_before_update,
                &batch.mask,
                &batch.scores,
                k,
            ));
            metrics.prm_new_batch_ranking = implicit_prm::ranking_accuracy(
                &pass.q_before_update,
                &batch.mask,
                &batch.scores,
                k,
            );
            metrics.prm_loss = pass.loss;
            metrics.prm_grad_norm = pass.grad_norm;
            metrics.prm_lr = prm_lr;
            pass.q
        }
        Estimator::Rloo => batch.mask.zeros_like().to_kind(Kind::Float),
    };
    metrics.time_prm_s = clock.elapsed().as_secs_f64();

    // 4. Rewards and advantages (spec §2.2, §2.5, §4).
    let clock = Instant::now();
    let prm_config = &config.algo.prm;
    let mask = &batch.mask;
    let sequence_rewards = implicit_prm::sequence_reward(&q, mask, prm_config.beta);
    (metrics.prm_reward_mean, metrics.prm_reward_std) = mean_std(&sequence_rewards);
    metrics.prm_accuracy = scalar(&implicit_prm::dpo_accuracy(&q, mask, &batch.scores, k));
    metrics.prm_abs_accuracy = scalar(&implicit_prm::dpo_abs_accuracy(&q, mask, &batch.scores));
    let process_rewards = implicit_prm::normalize_process_rewards(
        &implicit_prm::process_rewards(
            &q,
            mask,
            prm_config.beta,
            prm_config.process_reward,
            prm_config.granularity,
        ),
        prm_config.norm,
    );
    let returns = advantages::returns(
        &process_rewards,
        &batch.scores,
        mask,
        k,
        config.algo.estimator,
        &config.algo.advantage,
    );
    let advantages = advantages::whiten(&returns, mask);
    metrics.process_reward_abs_mean = scalar(&masks::masked_mean(&process_rewards.abs(), mask));
    metrics.return_mean = scalar(&masks::masked_mean(&returns, mask));
    metrics.time_advantages_s = clock.elapsed().as_secs_f64();

    // Off-policy groups (asynchronous rollouts): decoupled PPO's behaviour weights from the
    // actors' sampling log-probs. Only with max_staleness >= 1, so an on-policy run is
    // unchanged bit for bit.
    let behavior_weights = match (&batch.sampling_logprobs, config.algo.ppo.off_policy) {
        (Some(sampled), OffPolicyCorrection::Decoupled) if config.rollout.max_staleness >= 1 => {
            let w = ppo::behavior_weights(
                &old_logprobs,
                sampled,
                mask,
                config.algo.ppo.behavior_weight_cap,
            );
            let truncated = w
                .ge(config.algo.ppo.behavior_weight_cap)
                .logical_and(&mask.to_kind(Kind::Bool));
            metrics.behavior_weight_mean = Some(scalar(&masks::masked_mean(&w, mask)));
            metrics.behavior_weight_truncated = Some(scalar(&masks::masked_mean(
                &truncated.to_kind(Kind::Float),
                mask,
            )));
            Some(w)
        }
        (None, OffPolicyCorrection::Decoupled) if config.rollout.max_staleness >= 1 => {
            return Err(LearnerError::Config {
                path: "learner.algo.ppo.off_policy".into(),
                message: "decoupled PPO needs the behaviour policy's log-probs, and a group of \
                          this batch came without them (set off_policy = \"none\" to train \
                          stale groups as on-policy)"
                    .into(),
            });
        }
        _ => None,
    };

    // 5. PPO pass (spec §6).
    // Forward 4 (with its backward, per mini-batch): the policy's new log-probs for the
    // clipped surrogate.
    let clock = Instant::now();
    let policy_lr = config.policy_optimizer.lr_at(iteration);
    let pass = policy_pass(
        models,
        dp,
        &batch,
        &old_logprobs,
        &reference_logprobs,
        &advantages,
        behavior_weights.as_ref(),
        config,
        policy_lr,
    )?;
    metrics.policy_loss = pass.loss;
    metrics.clip_fraction = pass.clip_fraction;
    metrics.approx_kl = pass.approx_kl;
    metrics.policy_grad_norm = pass.grad_norm;
    metrics.policy_lr = policy_lr;
    metrics.time_policy_s = clock.elapsed().as_secs_f64();

    let lengths = masks::valid_lengths(mask).to_kind(Kind::Double);
    metrics.response_tokens = scalar(&lengths.sum(Kind::Double)) as i64;
    metrics.response_length_mean = scalar(&lengths.mean(Kind::Double));
    metrics.total_tokens = batch.sequences.iter().map(|s| s.len() as i64).sum();
    (metrics.score_mean, metrics.score_std) = mean_std(&batch.scores);
    tracing::info!(
        prm_loss = metrics.prm_loss,
        prm_accuracy = metrics.prm_accuracy,
        policy_loss = metrics.policy_loss,
        "step done"
    );
    Ok(metrics)
}
