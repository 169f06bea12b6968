//! The memory plan of a run: for each role (a learner rank, an actor, a PRM server), what one
//! GPU holds, whether it fits, and which keys to change when it does not. `prime plan` prints
//! it; a learner rank and an actor on CUDA compute the same plan at start and refuse what
//! cannot fit (unless `--force`).
//!
//! The model's own terms (weights, activations of a micro-batch, the logits chunk, the KV
//! cache, sampling) are `prime_model::memory`'s; this module adds the optimizer, the ZeRO
//! stages, communication buckets and the phases of a PRIME step. Formulas are in bytes, with
//! `P` a model's parameters, `W` the learner ranks, `ep` bytes per stored weight.
use std::path::Path;

use prime_algo::ReferenceType;
use prime_model::memory::{
    actor_plan, frozen_phases, gib, kv_cache, peak, sampling_phases, training_phases, ActorSetup,
    AttentionKernel, Batch, Dims, Dtypes, Gradients, Phase, RolePlan, Sampling, Term, TrainingPass,
    GIB,
};
use prime_model::Qwen2Config;
use tch::Kind;

use crate::checkpoint::sft_checkpoint;
use crate::config::{LearnerConfig, RunConfig};
use crate::error::{LearnerError, Result};
use crate::eval::EVAL_CALL_ROWS;

/// How rank 0's evaluation phases are named.
const EVALUATION: &str = "evaluation (rank 0)";

/// Positions per chunk of `prime prm-server serve`'s log-probs (`sequence_logprobs`).
const PRM_SERVER_CHUNK: u64 = prime_model::logprobs::SEQUENCE_LOGPROB_CHUNK as u64;

/// `prime prm-server serve --max-batch-tokens`'s default.
pub const PRM_SERVER_BATCH_TOKENS: u64 = 16384;

/// `prime actor run --max-prompts`'s default.
pub const ACTOR_MAX_PROMPTS: u64 = 8;

/// The shapes of the models a run trains: the policy, and the PRM (also the reference's).
#[derive(Debug, Clone, PartialEq)]
pub struct Shapes {
    pub policy: Qwen2Config,
    pub prm: Qwen2Config,
}

impl Shapes {
    /// The run's start models as a learner rank loads them: `model.path` (else the run's
    /// supervised checkpoint under `run_dir`) and `learner.prm_path` (else the policy's).
    pub fn of_run(config: &RunConfig, run_dir: &Path) -> Result<Self> {
        let policy_dir = config
            .model
            .path
            .clone()
            .unwrap_or_else(|| sft_checkpoint(run_dir));
        Self::read(config, &policy_dir.join("config.json"))
    }

    /// The shapes `prime plan` plans for: `model_config` (a `config.json`, or a directory
    /// holding one) when given, else `model.path`'s, else a from-scratch `[model]` with the
    /// embedded world's largest vocabulary.
    pub fn for_plan(config: &RunConfig, model_config: Option<&Path>) -> Result<Self> {
        let file = match (model_config, &config.model.path) {
            (Some(path), _) if path.is_dir() => path.join("config.json"),
            (Some(path), _) => path.to_path_buf(),
            (None, Some(dir)) => dir.join("config.json"),
            (None, None) => {
                let vocab = config.world.vocab_size as i64;
                let policy = config.model.qwen2_config(vocab, 0, 0);
                return Ok(Self {
                    prm: prm_shape(config)?.unwrap_or_else(|| policy.clone()),
                    policy,
                });
            }
        };
        Self::read(config, &file)
    }

    fn read(config: &RunConfig, policy_file: &Path) -> Result<Self> {
        if !policy_file.exists() {
            return Err(LearnerError::Data(format!(
                "no model config at {}: bring the start model, or point `prime plan \
                 --model-config` at its config.json",
                policy_file.display()
            )));
        }
        let policy = Qwen2Config::from_file(policy_file)?;
        Ok(Self {
            prm: prm_shape(config)?.unwrap_or_else(|| policy.clone()),
            policy,
        })
    }

    /// The larger of the two models (the one whose passes need more).
    fn larger(&self) -> &Qwen2Config {
        if self.prm.num_parameters() > self.policy.num_parameters() {
            &self.prm
        } else {
            &self.policy
        }
    }
}

/// `learner.prm_path`'s shape when it is set.
fn prm_shape(config: &RunConfig) -> Result<Option<Qwen2Config>> {
    match &config.learner.prm_path {
        Some(dir) => Ok(Some(Qwen2Config::from_file(&dir.join("config.json"))?)),
        None => Ok(None),
    }
}

/// How the learner ranks share the training state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Every rank holds weights, gradients and optimizer state whole.
    None,
    /// `learner.parallel.zero1`: AdamW's moments and the f32 weights it updates sharded.
    Zero1,
    /// `learner.parallel.zero2`: the gradients sharded too, reduce-scattered layer by layer.
    Zero2,
    /// `learner.parallel.zero3`: the parameters sharded too, each unit gathered for its
    /// forward and again for its recomputed backward.
    Zero3,
}

impl Sharding {
    /// What `config` asks for with `world` ranks (one rank shards nothing).
    pub fn of(config: &LearnerConfig, world: u64) -> Self {
        let parallel = &config.parallel;
        if world <= 1 {
            Self::None
        } else if parallel.zero3 {
            Self::Zero3
        } else if parallel.zero2 {
            Self::Zero2
        } else if parallel.zero1 {
            Self::Zero1
        } else {
            Self::None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::None => "no sharding",
            Self::Zero1 => "ZeRO-1",
            Self::Zero2 => "ZeRO-2",
            Self::Zero3 => "ZeRO-3",
        }
    }

    fn gradients(self) -> Gradients {
        match self {
            Self::None | Self::Zero1 => Gradients::Accumulate,
            Self::Zero2 | Self::Zero3 => Gradients::Sink,
        }
    }
}

/// The micro-batches that may have the largest activations under a budget of `budget`
/// tokens (`learner.memory.micro_batch_tokens`) for sequences of up to `longest` tokens: as
/// many whole longest rows as the budget holds (one when it holds none), and one row more of
/// the width that fills the budget (more tokens, shorter rows).
fn longest_micro_batches(budget: u64, longest: u64) -> Vec<Batch> {
    let rows = (budget / longest).max(1);
    let mut out = vec![Batch {
        rows,
        width: longest,
    }];
    let width = budget / (rows + 1);
    if width > 0 && width < longest {
        out.push(Batch {
            rows: rows + 1,
            width,
        });
    }
    out
}

/// The learner rank's training micro-batch phases (the larger model's), the largest of the
/// candidate micro-batches.
fn micro_batch_phases(
    config: &LearnerConfig,
    dims: &Dims,
    dtypes: Dtypes,
    recompute: bool,
    gradients: Gradients,
) -> (Batch, Vec<Phase>) {
    let memory = &config.memory;
    let longest = (config.data.max_prompt_tokens + config.rollout.max_response_tokens) as u64;
    let candidates = longest_micro_batches(memory.micro_batch_tokens as u64, longest);
    candidates
        .into_iter()
        .map(|batch| {
            let pass = TrainingPass {
                dtypes,
                kernel: AttentionKernel::Math,
                batch,
                logit_chunk: memory.logit_chunk_tokens.max(1) as u64,
                // The recomputing path takes every next-token log-prob; the plain one the
                // response's (`response_logprobs`).
                logprob_positions: if recompute {
                    batch.width - 1
                } else {
                    config.rollout.max_response_tokens as u64
                },
                recompute,
                gradients,
            };
            (batch, training_phases(dims, &pass))
        })
        .max_by_key(|(_, phases)| peak(phases).map_or(0, Phase::bytes))
        .expect("one candidate at least")
}

/// One learner rank (rank 0, which also evaluates) of `world` on a CUDA device of
/// `device_bytes`, with `sharding`; bf16 compute and the math attention kernel, as CUDA runs
/// the model's masked attention.
pub fn learner_rank_plan(
    config: &LearnerConfig,
    shapes: &Shapes,
    world: u64,
    sharding: Sharding,
    device_bytes: u64,
) -> RolePlan {
    let memory = &config.memory;
    let (policy, prm) = (Dims::of(&shapes.policy), Dims::of(&shapes.prm));
    let trained = policy.parameters() + prm.parameters();
    let param_kind = memory.param_dtype.kind();
    let dtypes = Dtypes::new(param_kind, Kind::BFloat16);
    let ep = dtypes.param;
    let w = world.max(1);
    let reference = config.algo.reference == ReferenceType::Freeze;
    let masters = memory.master_weights && param_kind != Kind::Float;
    let mut resident = Vec::new();
    match sharding {
        Sharding::Zero3 => {
            resident.push(Term::new(
                "policy and PRM weights, 1/W each",
                "ep (P + P') / W",
                ep * trained / w,
            ));
            if reference {
                resident.push(Term::new(
                    "reference weights, 1/W",
                    "ep P' / W",
                    ep * prm.parameters() / w,
                ));
            }
            let unit = Dims::of(shapes.larger()).largest_unit();
            resident.push(Term::new(
                "gathered units: the one running and the next (prefetch)",
                "2 ep max(Pl, V D)",
                2 * ep * unit,
            ));
        }
        _ => {
            resident.push(Term::new(
                format!("policy and PRM weights ({param_kind:?})"),
                "ep (P + P')",
                ep * trained,
            ));
            if reference {
                resident.push(Term::new(
                    format!("reference weights ({param_kind:?})"),
                    "ep P'",
                    ep * prm.parameters(),
                ));
            }
        }
    }
    match sharding {
        Sharding::None | Sharding::Zero1 => resident.push(Term::new(
            "gradients (.grad, in the weights' dtype)",
            "ep (P + P')",
            ep * trained,
        )),
        Sharding::Zero2 | Sharding::Zero3 => resident.push(Term::new(
            "gradient shards (f32, summed over micro-batches and ranks)",
            "4 (P + P') / W",
            4 * trained / w,
        )),
    }
    match sharding {
        Sharding::None => {
            resident.push(Term::new("AdamW moments (f32)", "8 (P + P')", 8 * trained));
            if masters {
                resident.push(Term::new("master weights (f32)", "4 (P + P')", 4 * trained));
            }
        }
        _ => {
            resident.push(Term::new(
                "AdamW moment shards (f32)",
                "8 (P + P') / W",
                8 * trained / w,
            ));
            resident.push(Term::new(
                "f32 weight shards AdamW updates (the masters)",
                "4 (P + P') / W",
                4 * trained / w,
            ));
        }
    }

    let larger = Dims::of(shapes.larger());
    let recompute = memory.recompute_activations || sharding == Sharding::Zero3;
    let gradients = sharding.gradients();
    let (batch, mut training) = micro_batch_phases(config, &larger, dtypes, recompute, gradients);
    let bucket = memory_bucket_bytes(config);
    if gradients == Gradients::Sink {
        for phase in &mut training {
            phase.terms.push(Term::new(
                "reduce-scatter bucket (f32) and this rank's result",
                "B (1 + 1/W)",
                bucket + bucket / w,
            ));
        }
    }
    let response = config.rollout.max_response_tokens as u64;
    let frozen = frozen_phases(
        &larger,
        dtypes,
        AttentionKernel::Math,
        batch,
        memory.logit_chunk_tokens.max(1) as u64,
        response,
    );
    let mut phases = training;
    phases.extend(frozen);
    phases.push(optimizer_phase(sharding, &policy, &prm, w, bucket));
    let resident_bytes: u64 = resident.iter().map(|t| t.bytes).sum();
    let mut evaluation = evaluation_phases(config, &shapes.policy, device_bytes, resident_bytes);
    if sharding == Sharding::Zero3 {
        for phase in &mut evaluation {
            phase.terms.push(Term::new(
                "policy gathered whole on rank 0 (to publish, evaluate)",
                "ep P",
                ep * policy.parameters(),
            ));
        }
    }
    phases.extend(evaluation);

    let setup = format!(
        "W = {w}, {}, {}, micro-batch {} x {} tokens, logits chunk {}, {param_kind:?} weights{}",
        sharding.name(),
        if recompute {
            "recomputed activations"
        } else {
            "no recomputation"
        },
        batch.rows,
        batch.width,
        memory.logit_chunk_tokens,
        if masters { " + f32 masters" } else { "" },
    );
    let mut notes = vec![
        "attention on the math kernel: CUDA runs it for the model's masked grouped-query \
         attention (f32 scores of every query against every key)"
            .to_string(),
        "the evaluation samples as many rows at once as its KV cache budget holds \
         (learner.memory.kv_cache_gib, else half of what the resident state leaves, the CUDA \
         default)"
            .to_string(),
    ];
    if sharding == Sharding::Zero3 {
        notes.push(
            "ZeRO-3 gathers one unit (a decoder layer, the embeddings, the head) at a time and \
             plans room for the next one too (a prefetch); rank 0 holds the policy whole \
             between steps, to publish and evaluate it, and the PRM whole on the host"
                .into(),
        );
    }
    let activations_without = if recompute {
        let (_, plain) = micro_batch_phases(config, &larger, dtypes, false, Gradients::Accumulate);
        peak(&plain).map(|p| (false, p.bytes()))
    } else {
        let (_, recomputed) = micro_batch_phases(config, &larger, dtypes, true, gradients);
        peak(&recomputed).map(|p| (true, p.bytes()))
    };
    if let Some((with, bytes)) = activations_without {
        notes.push(format!(
            "the training micro-batch {} recomputation: {} GiB",
            if with { "with" } else { "without" },
            gib(bytes)
        ));
    }
    RolePlan {
        role: "learner rank".into(),
        setup,
        resident,
        phases,
        device_bytes,
        changes: Vec::new(),
        notes,
    }
}

/// `learner.parallel.bucket_mb` in bytes.
fn memory_bucket_bytes(config: &LearnerConfig) -> u64 {
    config.parallel.bucket_mb as u64 * (1 << 20)
}

/// The optimizer step's transients: AdamW's f32 temporaries (the gradient in f32, the
/// denominator, the update, the decayed weight and one more, `20 n` for a parameter of `n`
/// elements), over the largest parameter unsharded, the shard with ZeRO-1 (with the flat f32
/// gradient and the f32 gather of the updated weights of a whole model, `8 P`), a bucket's
/// chunk with ZeRO-2 (with the bucket gathered back).
fn optimizer_phase(sharding: Sharding, policy: &Dims, prm: &Dims, w: u64, bucket: u64) -> Phase {
    let largest_model = policy.parameters().max(prm.parameters());
    let largest_tensor = policy.vocab_matrix().max(prm.vocab_matrix());
    let terms = match sharding {
        Sharding::None => vec![
            Term::new(
                "AdamW temporaries of the largest parameter (f32)",
                "20 V D",
                20 * largest_tensor,
            ),
            Term::new(
                "all-reduce bucket (f32)",
                "B",
                if w > 1 { bucket } else { 0 },
            ),
        ],
        Sharding::Zero1 => vec![
            Term::new(
                "flat f32 gradient and gathered f32 weights of one model",
                "8 P",
                8 * largest_model,
            ),
            Term::new(
                "AdamW temporaries of the shard (f32)",
                "20 P / W",
                20 * largest_model / w,
            ),
        ],
        Sharding::Zero2 | Sharding::Zero3 => vec![
            Term::new(
                "AdamW temporaries of a bucket's chunk (f32)",
                "20 B / 4W",
                20 * bucket / 4 / w,
            ),
            Term::new(
                "all-gather bucket (f32) and this rank's chunk",
                "B (1 + 1/W)",
                bucket + bucket / w,
            ),
        ],
    };
    Phase {
        name: "optimizer step".into(),
        terms: terms.into_iter().filter(|t| t.bytes > 0).collect(),
    }
}

/// Rank 0's held-out evaluation: sampling calls of up to 256 rows (`learner.eval.problems`
/// x `samples` when fewer), every row its own prompt (the greedy pass) of up to
/// `max_prompt_tokens`, responses of up to `max_response_tokens`. The sampler decodes as many
/// rows at once as its KV cache budget holds: `learner.memory.kv_cache_gib`, else half of
/// what `resident` bytes leave of `device_bytes` (the budget's CUDA default, half of the
/// free memory).
fn evaluation_phases(
    config: &LearnerConfig,
    policy: &Qwen2Config,
    device_bytes: u64,
    resident: u64,
) -> Vec<Phase> {
    let eval = &config.eval;
    let per_call = EVAL_CALL_ROWS as u64;
    let rows = match eval.problems {
        0 => per_call,
        problems => per_call.min((problems * eval.samples.max(1)) as u64),
    };
    let sampling = Sampling {
        rows,
        groups: rows,
        prompt: config.data.max_prompt_tokens as u64,
        max_new: config.rollout.max_response_tokens as u64,
    };
    let dims = Dims::of(policy);
    let budget = match config.memory.kv_cache_gib {
        Some(gib) => (gib * GIB as f64) as u64,
        None => device_bytes.saturating_sub(resident) / 2,
    };
    // The sampler admits rows while their cache fits the budget (one at least).
    let per_row = kv_cache(
        &dims,
        2,
        Sampling {
            rows: 1,
            ..sampling
        },
    )
    .bytes
    .max(1);
    let admitted = (budget / per_row).clamp(1, rows);
    let sampling = Sampling {
        rows: admitted,
        groups: admitted,
        ..sampling
    };
    let kv = kv_cache(&dims, 2, sampling);
    sampling_phases(&dims, 2, AttentionKernel::Math, sampling, kv)
        .into_iter()
        .map(|mut phase| {
            phase.name = format!("{EVALUATION} {}", phase.name);
            phase
        })
        .collect()
}

/// Whether `phase` is rank 0's evaluation (the others are every rank's step).
fn is_evaluation(phase: &Phase) -> bool {
    phase.name.starts_with(EVALUATION)
}

/// Whether the step's phases fit, rank 0's evaluation left aside.
fn step_fits(plan: &RolePlan) -> bool {
    let step = RolePlan {
        phases: plan
            .phases
            .iter()
            .filter(|p| !is_evaluation(p))
            .cloned()
            .collect(),
        ..plan.clone()
    };
    step.fits()
}

/// A key and the value a change sets.
type Change = (&'static str, String);

/// Changes of memory keys (none changes a result) that make the step fit, tried one after
/// another and kept as they go: ZeRO-2 over several ranks, recomputation, ZeRO-3 over
/// several ranks, a smaller logits chunk, a smaller micro-batch. Returns the changed config, the changes and whether the
/// step fits with them. `sharding` plans another sharding than the config's (ZeRO-3).
fn memory_key_changes(
    config: &LearnerConfig,
    shapes: &Shapes,
    world: u64,
    device_bytes: u64,
    sharding: Option<Sharding>,
) -> (LearnerConfig, Vec<Change>, bool) {
    let plan_of = |c: &LearnerConfig| {
        let sharding = sharding.unwrap_or_else(|| Sharding::of(c, world));
        learner_rank_plan(c, shapes, world, sharding, device_bytes)
    };
    let fits = |c: &LearnerConfig| step_fits(&plan_of(c));
    let mut config = config.clone();
    let mut changes: Vec<Change> = Vec::new();
    if fits(&config) {
        return (config, changes, true);
    }
    if sharding.is_none() && world > 1 && !config.parallel.zero2 {
        config.parallel.zero2 = true;
        changes.push(("learner.parallel.zero2", "true".into()));
    }
    if !config.memory.recompute_activations {
        config.memory.recompute_activations = true;
        changes.push(("learner.memory.recompute_activations", "true".into()));
    }
    if sharding.is_none() && world > 1 && !config.parallel.zero3 && !fits(&config) {
        config.parallel.zero3 = true;
        changes.push(("learner.parallel.zero3", "true".into()));
    }
    type Knob = (&'static str, fn(&mut LearnerConfig) -> Option<String>);
    let knobs: [Knob; 2] = [
        ("learner.memory.logit_chunk_tokens", |c| {
            let chunk = &mut c.memory.logit_chunk_tokens;
            (*chunk > 128).then(|| {
                *chunk /= 2;
                chunk.to_string()
            })
        }),
        ("learner.memory.micro_batch_tokens", |c| {
            let longest = c.data.max_prompt_tokens + c.rollout.max_response_tokens;
            let budget = &mut c.memory.micro_batch_tokens;
            (*budget > longest).then(|| {
                *budget = (*budget / 2).max(longest);
                budget.to_string()
            })
        }),
    ];
    for (key, shrink) in knobs {
        while !fits(&config) {
            let Some(value) = shrink(&mut config) else {
                break;
            };
            match changes.iter_mut().find(|(k, _)| *k == key) {
                Some(change) => change.1 = value,
                None => changes.push((key, value)),
            }
        }
    }
    let fit = fits(&config);
    (config, changes, fit)
}

/// The longest `max_response_tokens` (below the configured one) with which `fits` holds for
/// micro-batches of one sequence, by bisection; `None` when not even one token does.
fn longest_response_that_fits(
    config: &LearnerConfig,
    fits: impl Fn(&LearnerConfig) -> bool,
) -> Option<usize> {
    let with = |response: usize| {
        let mut c = config.clone();
        c.rollout.max_response_tokens = response;
        c.memory.micro_batch_tokens = c.data.max_prompt_tokens + response;
        fits(&c)
    };
    if !with(1) {
        return None;
    }
    // `low` fits, `high` does not.
    let (mut low, mut high) = (1, config.rollout.max_response_tokens);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if with(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(low)
}

/// The fewest learner ranks (up to 1,024) with which `config`'s step fits, with ZeRO-2.
fn ranks_that_fit(config: &LearnerConfig, shapes: &Shapes, device_bytes: u64) -> Option<u64> {
    (2..=1024).find(|&w| {
        step_fits(&learner_rank_plan(
            config,
            shapes,
            w,
            Sharding::Zero2,
            device_bytes,
        ))
    })
}

/// The learner rank's plan with `sharding` (the config's when `None`) and, when it does not
/// fit, what to change: memory keys that make the step fit (or the reason none do), then
/// what rank 0's evaluation needs.
fn advised_learner_plan(
    config: &LearnerConfig,
    shapes: &Shapes,
    world: u64,
    device_bytes: u64,
    sharding: Option<Sharding>,
) -> RolePlan {
    let plan_of = |c: &LearnerConfig| {
        let sharding = sharding.unwrap_or_else(|| Sharding::of(c, world));
        learner_rank_plan(c, shapes, world, sharding, device_bytes)
    };
    let mut plan = plan_of(config);
    if plan.fits() {
        return plan;
    }
    let (changed, changes, step_fit) =
        memory_key_changes(config, shapes, world, device_bytes, sharding);
    let mut advice: Vec<String> = changes
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect();
    let after = plan_of(&changed);
    if !step_fit {
        let largest = peak(
            &after
                .phases
                .iter()
                .filter(|p| !is_evaluation(p))
                .cloned()
                .collect::<Vec<_>>(),
        )
        .map(|p| format!("{} ({} GiB)", p.name, gib(p.bytes())))
        .unwrap_or_default();
        advice = vec![format!(
            "no memory key makes the step fit {world} ranks: at best ({}) the resident state is \
             {} GiB and the largest phase {largest}",
            if changes.is_empty() {
                "as configured".to_string()
            } else {
                changes
                    .iter()
                    .map(|(key, value)| format!("{key} = {value}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            gib(after.resident_bytes()),
        )];
        if let Some(response) = longest_response_that_fits(&changed, |c| step_fits(&plan_of(c))) {
            let longest = changed.data.max_prompt_tokens + response;
            advice.push(format!(
                "with those, one sequence per micro-batch fits up to {longest} tokens \
                 (learner.rollout.max_response_tokens = {response}, \
                 learner.memory.micro_batch_tokens = {longest})"
            ));
        }
        if sharding.is_none() {
            if let Some(ranks) = ranks_that_fit(&changed, shapes, device_bytes) {
                advice.push(format!(
                    "the step fits {ranks} learner ranks with learner.parallel.zero2 = true"
                ));
            }
        }
    } else if !after.fits() {
        let evaluation = after
            .phases
            .iter()
            .filter(|p| is_evaluation(p))
            .max_by_key(|p| p.bytes())
            .map(|p| format!("{} needs {} GiB", p.name, gib(p.bytes())))
            .unwrap_or_default();
        let fewer = (1..=8).map(|h| EVAL_CALL_ROWS >> h).find(|&problems| {
            let mut c = changed.clone();
            c.eval.problems = problems;
            c.eval.samples = 1;
            plan_of(&c).fits()
        });
        let kv = (0..8).map(|h| 32.0 / f64::from(1u32 << h)).find(|&gib| {
            let mut c = changed.clone();
            c.memory.kv_cache_gib = Some(gib);
            plan_of(&c).fits()
        });
        advice.push(format!(
            "the step fits, rank 0's evaluation does not: {evaluation} (up to {} rows sampled \
             at once){}{}",
            EVAL_CALL_ROWS,
            match kv {
                Some(gib) =>
                    format!("; learner.memory.kv_cache_gib = {gib} fits, the same samples"),
                None => String::new(),
            },
            match fewer {
                Some(problems) => format!(
                    "; learner.eval.problems = {problems} with learner.eval.samples = 1 would \
                     fit, evaluating that many held-out problems"
                ),
                None => String::new(),
            }
        ));
    }
    plan.changes = advice;
    plan
}

/// The learner rank's plan with the config's sharding and, when it does not fit, what to
/// change (the plan a learner rank checks at start).
pub fn checked_learner_plan(
    config: &LearnerConfig,
    shapes: &Shapes,
    world: u64,
    device_bytes: u64,
) -> RolePlan {
    advised_learner_plan(config, shapes, world, device_bytes, None)
}

/// The machines `prime plan` plans for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cluster {
    pub nodes: u64,
    pub gpus_per_node: u64,
    /// Memory of one GPU, in GiB.
    pub gpu_memory_gib: f64,
    /// GPUs given to actors (one each); the others are learner ranks.
    pub actor_gpus: u64,
    /// Prompts per actor batch (`prime actor run --max-prompts`).
    pub actor_max_prompts: u64,
    /// Tokens per PRM server forward (`prime prm-server serve --max-batch-tokens`).
    pub prm_server_batch_tokens: u64,
}

impl Cluster {
    fn gpu_bytes(&self) -> u64 {
        (self.gpu_memory_gib * GIB as f64) as u64
    }

    /// The learner ranks: every GPU not given to an actor.
    pub fn learner_ranks(&self) -> Result<u64> {
        let gpus = self.nodes * self.gpus_per_node;
        if self.actor_gpus >= gpus {
            return Err(LearnerError::Data(format!(
                "{} actor GPUs leave none of the {gpus} GPUs for the learner",
                self.actor_gpus
            )));
        }
        Ok(gpus - self.actor_gpus)
    }
}

/// Every role's plan for a run on a cluster.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// What is planned, in a few lines.
    pub header: String,
    /// A learner rank as configured.
    pub learner: RolePlan,
    /// A learner rank with ZeRO-3, when the config shards less.
    pub zero3: Option<RolePlan>,
    pub actor: RolePlan,
    pub prm_server: RolePlan,
}

impl RunPlan {
    /// Whether every configured role fits (the ZeRO-3 row is informative only).
    pub fn fits(&self) -> bool {
        self.learner.fits() && self.actor.fits() && self.prm_server.fits()
    }

    /// The configured roles, then the ZeRO-3 row when there is one.
    fn rows(&self) -> impl Iterator<Item = (&RolePlan, &'static str)> {
        [&self.learner, &self.actor, &self.prm_server]
            .into_iter()
            .map(|plan| (plan, ""))
            .chain(self.zero3.iter().map(|plan| (plan, "with ZeRO-3, ")))
    }

    pub fn render(&self) -> String {
        let mut out = self.header.clone();
        for plan in [&self.learner, &self.actor, &self.prm_server] {
            out.push('\n');
            out.push_str(&plan.render());
        }
        if let Some(zero3) = &self.zero3 {
            out.push_str(&format!("\nwith ZeRO-3: {}\n", zero3.verdict()));
            out.push_str(&zero3.render());
        }
        out.push_str("\nverdicts:\n");
        for (plan, label) in self.rows() {
            out.push_str(&format!("  {label}{}\n", plan.verdict()));
        }
        out
    }
}

/// The plan of `config` on `cluster`: a learner rank (as configured, and with ZeRO-3 when
/// the config shards less), an actor with `cluster.actor_max_prompts` prompts of K samples,
/// and a PRM server.
pub fn plan_run(config: &LearnerConfig, shapes: &Shapes, cluster: &Cluster) -> Result<RunPlan> {
    let world = cluster.learner_ranks()?;
    let device = cluster.gpu_bytes();
    let policy = Dims::of(&shapes.policy);
    let longest = config.data.max_prompt_tokens + config.rollout.max_response_tokens;
    let billions = |p: u64| format!("{:.2} B", p as f64 / 1e9);
    let header = format!(
        "{} node(s) x {} GPUs of {:.1} GiB: {world} learner ranks, {} actor GPUs\n\
         policy {} parameters (hidden {}, {} layers, {}/{} heads, vocabulary {}), PRM and \
         reference {} parameters; sequences up to {} + {} = {longest} tokens\n",
        cluster.nodes,
        cluster.gpus_per_node,
        cluster.gpu_memory_gib,
        cluster.actor_gpus,
        billions(policy.parameters()),
        policy.d,
        policy.layers,
        policy.heads,
        policy.kv_heads,
        policy.v,
        billions(Dims::of(&shapes.prm).parameters()),
        config.data.max_prompt_tokens,
        config.rollout.max_response_tokens,
    );
    let learner = checked_learner_plan(config, shapes, world, device);
    let zero3 = (Sharding::of(config, world) != Sharding::Zero3)
        .then(|| advised_learner_plan(config, shapes, world, device, Some(Sharding::Zero3)));
    let actor = actor_plan(
        &shapes.policy,
        &ActorSetup {
            prompts: cluster.actor_max_prompts,
            samples: config.rollout.samples_per_prompt as u64,
            prompt: config.data.max_prompt_tokens as u64,
            max_new: config.rollout.max_response_tokens as u64,
            dtype: Kind::BFloat16,
            kernel: AttentionKernel::Math,
            device_bytes: device,
        },
    );
    let prm_server = prm_server_plan(
        shapes,
        longest as u64,
        cluster.prm_server_batch_tokens,
        device,
    );
    Ok(RunPlan {
        header,
        learner,
        zero3,
        actor,
        prm_server,
    })
}

/// `prime prm-server serve` on a GPU: the PRM and its reference in bf16, and forwards of up to
/// `batch_tokens` padded tokens (`--max-batch-tokens`) of sequences up to `longest`. When it
/// does not fit, the largest `--max-batch-tokens` (halving) that does is named.
pub fn prm_server_plan(
    shapes: &Shapes,
    longest: u64,
    batch_tokens: u64,
    device_bytes: u64,
) -> RolePlan {
    let mut plan = prm_server_terms(shapes, longest, batch_tokens, device_bytes);
    if !plan.fits() {
        let fitting = (1..16)
            .map(|halvings| batch_tokens >> halvings)
            .take_while(|&tokens| tokens >= longest)
            .find(|&tokens| prm_server_terms(shapes, longest, tokens, device_bytes).fits());
        plan.changes.push(match fitting {
            Some(tokens) => format!("prime prm-server serve --max-batch-tokens {tokens}"),
            None => format!(
                "prime prm-server serve --max-batch-tokens {longest} (one sequence at a time), or a \
                 larger GPU"
            ),
        });
    }
    plan
}

/// [`prm_server_plan`] without the search for what fits.
fn prm_server_terms(
    shapes: &Shapes,
    longest: u64,
    batch_tokens: u64,
    device_bytes: u64,
) -> RolePlan {
    let dims = Dims::of(&shapes.prm);
    let dtypes = Dtypes::new(Kind::BFloat16, Kind::BFloat16);
    let batch = Batch {
        rows: (batch_tokens / longest).max(1),
        width: longest,
    };
    RolePlan {
        role: "prm-server".into(),
        setup: format!(
            "--max-batch-tokens {batch_tokens}: {} x {} tokens, bf16",
            batch.rows, batch.width
        ),
        resident: vec![Term::new(
            "PRM and reference weights (bf16)",
            "2 x 2 P'",
            4 * dims.parameters(),
        )],
        phases: frozen_phases(
            &dims,
            dtypes,
            AttentionKernel::Math,
            batch,
            PRM_SERVER_CHUNK,
            longest - 1,
        ),
        device_bytes,
        changes: Vec::new(),
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_micro_batches_fill_the_budget() {
        let batch = |rows, width| Batch { rows, width };
        // Whole longest rows, or one row more of the width that fills the budget.
        assert_eq!(
            longest_micro_batches(16384, 4096),
            vec![batch(4, 4096), batch(5, 3276)]
        );
        assert_eq!(
            longest_micro_batches(6000, 4096),
            vec![batch(1, 4096), batch(2, 3000)]
        );
        // A budget below one longest row: that row goes alone.
        assert_eq!(
            longest_micro_batches(1000, 4096),
            vec![batch(1, 4096), batch(2, 500)]
        );
        assert_eq!(
            longest_micro_batches(4096, 4096),
            vec![batch(1, 4096), batch(2, 2048)]
        );
    }
}
