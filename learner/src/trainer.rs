//! The learner's loop around [`prime_step`]: it owns the models (on one compute thread),
//! turns a filtered batch from the [`Scheduler`] into a step, evaluates on the held-out set,
//! writes `metrics.jsonl` and checkpoints, and resumes from them exactly.
//!
//! Rollouts come from remote actors in the service ([`crate::service`]) or, for a single
//! process and the tests, from [`crate::eval::local_rollouts`] on the learner's own policy.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prime_collective::Collective;
use prime_model::{CausalLm, KvBudget, SamplingParams, Tokenizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::batch::ScoredGroup;
use crate::checkpoint::{self, CheckpointParts, RngState, TrainerState};
use crate::config::{LearnerConfig, ParallelConfig};
use crate::data::EvalProblem;
use crate::error::{LearnerError, Result};
use crate::eval::{evaluate, rollout_params, Evaluation, Grading};
use crate::models::PrimeModels;
use crate::optim::AdamW;
use crate::parallel::{Command, DataParallel, Trained};
use crate::scheduler::{Batch, SchedulerState};
use crate::step::{prime_step, StepMetrics};
use crate::tensorboard::EventWriter;

/// Where a learner run keeps its files.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The run directory.
    pub root: PathBuf,
}

impl RunPaths {
    /// `metrics.jsonl`: one JSON object per step or evaluation.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `tensorboard/`: scalar event files, one per learner process start.
    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tensorboard")
    }
    /// `checkpoints/`: `step-NNNNNN/` directories and `latest`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A training step.
    Step(Box<StepRecord>),
    /// A held-out evaluation after `step` steps.
    Eval {
        /// Steps done when evaluated.
        step: u64,
        /// The result.
        #[serde(flatten)]
        evaluation: Evaluation,
    },
}

impl Record {
    /// The step a record belongs to and its scalars under the namespaced keys of
    /// docs/metrics.md (`actor/pg_loss`, `critic/score/mean`, `timing_s/gen`, ...), as the
    /// TensorBoard event files carry them.
    pub fn scalars(&self) -> (u64, Vec<(String, f64)>) {
        match self {
            Record::Step(record) => (record.step, step_scalars(record)),
            Record::Eval { step, evaluation } => (*step, eval_scalars(evaluation)),
        }
    }
}

/// A step record's scalars (see [`Record::scalars`]).
fn step_scalars(r: &StepRecord) -> Vec<(String, f64)> {
    let m = &r.metrics;
    let mut scalars: Vec<(&str, f64)> = vec![
        ("actor/pg_loss", m.policy_loss),
        ("actor/pg_clipfrac", m.clip_fraction),
        ("actor/ppo_kl", m.approx_kl),
        ("actor/entropy", m.entropy),
        ("actor/grad_norm", m.policy_grad_norm),
        ("actor/lr", m.policy_lr),
        ("prm/loss", m.prm_loss),
        ("prm/new_batch_loss", m.prm_new_batch_loss),
        ("prm/new_batch_acc", m.prm_new_batch_accuracy),
        ("prm/dpo_acc", m.prm_accuracy),
        ("prm/dpo_acc_abs", m.prm_abs_accuracy),
        ("prm/grad_norm", m.prm_grad_norm),
        ("prm/lr", m.prm_lr),
        ("prm/reward/mean", m.prm_reward_mean),
        ("prm/reward/std", m.prm_reward_std),
        ("prm/process_reward_abs_mean", m.process_reward_abs_mean),
        ("critic/score/mean", m.score_mean),
        ("critic/score/std", m.score_std),
        ("critic/score/unfiltered_mean", r.train_reward),
        ("critic/returns/mean", m.return_mean),
        ("response_length/mean", m.response_length_mean),
        ("response_length/tokens", m.response_tokens as f64),
        ("batch/groups", m.groups as f64),
        ("batch/responses", m.responses as f64),
        ("batch/groups_seen", r.groups_seen as f64),
        ("batch/filter_pass_rate", r.filter_pass_rate),
        ("batch/policy_version", r.policy_version as f64),
        ("batch/oldest_group_version", r.group_versions[0] as f64),
        ("perf/throughput", r.tokens_per_second),
        ("perf/total_tokens", m.total_tokens as f64),
        ("timing_s/gen", r.rollout_seconds),
        ("timing_s/step", r.train_seconds),
        ("timing_s/old_log_prob", m.time_old_logprobs_s),
        ("timing_s/ref", m.time_reference_s),
        ("timing_s/update_prm", m.time_prm_s),
        ("timing_s/adv", m.time_advantages_s),
        ("timing_s/update_actor", m.time_policy_s),
        ("timing_s/wall", r.wall_seconds),
    ];
    if let Some(ranking) = m.prm_new_batch_ranking {
        scalars.push(("prm/new_batch_ranking", ranking));
    }
    if let Some(gap) = m.sampler_logprob_gap {
        scalars.push(("actor/sampler_logprob_gap", gap));
    }
    if let Some(mean) = m.behavior_weight_mean {
        scalars.push(("actor/behavior_weight_mean", mean));
    }
    if let Some(share) = m.behavior_weight_truncated {
        scalars.push(("actor/behavior_weight_truncated", share));
    }
    scalars
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// An evaluation's scalars (see [`Record::scalars`]): `val/test_score/<data_source>` as
/// verl names the per-source score.
fn eval_scalars(e: &Evaluation) -> Vec<(String, f64)> {
    let mut scalars = vec![
        ("val/accuracy".to_string(), e.accuracy),
        ("val/problems".to_string(), e.problems as f64),
        ("timing_s/eval".to_string(), e.seconds),
    ];
    if let Some(greedy) = e.greedy_accuracy {
        scalars.push(("val/greedy_accuracy".to_string(), greedy));
    }
    for (ability, accuracy) in &e.accuracy_by_ability {
        scalars.push((format!("val/accuracy/{ability}"), *accuracy));
    }
    for (source, accuracy) in &e.accuracy_by_source {
        scalars.push((format!("val/test_score/{source}"), *accuracy));
    }
    scalars
}

/// What one iteration measured, with the batch collection that preceded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Steps done, this one included.
    pub step: u64,
    /// Policy version the batch was collected for.
    pub policy_version: u64,
    /// Oldest and newest policy version among the batch's groups (each group comes from one
    /// version; on-policy both equal `policy_version`).
    pub group_versions: [u64; 2],
    /// Seconds since the run (or the resumed run) started.
    pub wall_seconds: f64,
    /// Seconds spent collecting the batch (rollouts, grading, filtering).
    pub rollout_seconds: f64,
    /// Seconds of the step itself, from the filtered batch to this record: the timed parts in
    /// `metrics` (`time_*_s`) plus what lies between them. Evaluation, checkpointing and
    /// publishing the weights come after the record and are not in it (0 in records written
    /// before this field existed).
    #[serde(default)]
    pub train_seconds: f64,
    /// Groups that arrived for this batch, kept or not.
    pub groups_seen: u64,
    /// Share of arrived groups the filter kept.
    pub filter_pass_rate: f64,
    /// Mean outcome score over every arrived group: the training reward before filtering.
    pub train_reward: f64,
    /// Sampled tokens (prompt excluded) per second of the whole iteration.
    pub tokens_per_second: f64,
    /// The step's own figures.
    #[serde(flatten)]
    pub metrics: StepMetrics,
}

/// The training loop's state: models, optimizers, counters and the output files.
#[derive(Debug)]
pub struct Trainer {
    /// The learner config.
    pub config: LearnerConfig,
    /// Policy, PRM, reference and their optimizers.
    pub models: PrimeModels,
    /// This rank's data-parallel group (a group of one unless [`Trainer::join`] was called).
    pub dp: DataParallel,
    /// The tokenizer the three models share.
    pub tokenizer: Tokenizer,
    tokenizer_dir: PathBuf,
    heldout: Vec<EvalProblem>,
    /// How held-out responses (and local rollouts) are graded: math in process, code in this
    /// process's sandbox or by a Verifier service.
    pub grading: Grading,
    paths: RunPaths,
    /// RL iterations done.
    pub step: u64,
    /// Version of the current policy weights (one per step).
    pub policy_version: u64,
    /// Seeds of rollouts and evaluations; saved in checkpoints.
    pub rng: ChaCha8Rng,
    started: Instant,
    /// Every record of this run, resumed ones included.
    pub history: Vec<Record>,
    /// The live TensorBoard event file under `RUN/tensorboard/`, opened at the first record.
    tensorboard: Option<EventWriter>,
}

/// The models a run starts from, all Hugging Face directories.
#[derive(Debug, Clone)]
pub struct StartModels {
    /// The policy (and, unless `prm` is set, the PRM and the reference).
    pub policy: PathBuf,
    /// The PRM and the reference, when they differ from the policy.
    pub prm: Option<PathBuf>,
    /// Tokenizer files to copy into checkpoints.
    pub tokenizer_dir: PathBuf,
}

/// Loads a Hugging Face model directory with weights stored as `param_kind`.
pub(crate) fn load_model(dir: &Path, device: Device, param_kind: Kind) -> Result<CausalLm> {
    Ok(CausalLm::load(
        dir,
        device,
        param_kind,
        prime_model::default_kind(device),
    )?)
}

impl Trainer {
    /// A fresh run from `start`, or the latest checkpoint under the run dir when `resume`
    /// is set and one exists. Returns the trainer and the scheduler state to resume with.
    pub fn open(
        config: LearnerConfig,
        start: &StartModels,
        heldout: Vec<EvalProblem>,
        run_dir: &Path,
        device: Device,
        resume: bool,
    ) -> Result<(Self, Option<SchedulerState>)> {
        config.validate().map_err(LearnerError::Data)?;
        let paths = RunPaths {
            root: run_dir.to_path_buf(),
        };
        std::fs::create_dir_all(&paths.root).map_err(LearnerError::io(&paths.root))?;
        let tokenizer = Tokenizer::from_dir(&start.tokenizer_dir)?;
        let found = if resume {
            checkpoint::latest(&paths.checkpoints())?
        } else {
            None
        };
        let reference_dir = start.prm.as_deref().unwrap_or(&start.policy);
        let kind = config.memory.param_dtype.kind();
        let needs_reference = config.algo.reference == prime_algo::ReferenceType::Freeze;
        let reference = if needs_reference {
            Some(load_model(reference_dir, device, kind)?)
        } else {
            None
        };
        let (models, state, history) = match found {
            Some(dir) => {
                let policy = load_model(&dir.join(checkpoint::POLICY_DIR), device, kind)?;
                let prm = load_model(&dir.join(checkpoint::PRM_DIR), device, kind)?;
                let mut models = PrimeModels::new(policy, prm, reference, &config);
                // With a sharded optimizer the state stays on the host: attaching to the
                // group moves only this rank's shard to the device.
                let load = if config.parallel.zero1 || config.parallel.zero2 {
                    checkpoint::load_optimizer_to_host
                } else {
                    checkpoint::load_optimizer
                };
                load(
                    &dir.join(checkpoint::POLICY_OPTIMIZER_FILE),
                    &mut models.policy_optimizer,
                )?;
                load(
                    &dir.join(checkpoint::PRM_OPTIMIZER_FILE),
                    &mut models.prm_optimizer,
                )?;
                let state = checkpoint::load_state(&dir)?;
                let history = read_history(&paths.metrics(), state.step)?;
                rewrite_history(&paths.metrics(), &history)?;
                tracing::info!(checkpoint = %dir.display(), step = state.step, "resumed");
                (models, Some(state), history)
            }
            None => {
                let policy = load_model(&start.policy, device, kind)?;
                let prm = load_model(reference_dir, device, kind)?;
                let models = PrimeModels::new(policy, prm, reference, &config);
                std::fs::write(paths.metrics(), "").map_err(LearnerError::io(paths.metrics()))?;
                (models, None, Vec::new())
            }
        };
        // The problems every evaluation uses: `eval.problems` of them, from every ability and
        // data source in turn.
        let strata: Vec<(u8, &str)> = heldout
            .iter()
            .map(|p| (p.ability as u8, p.data_source.as_str()))
            .collect();
        let picked = crate::eval::stratified_subset(&strata, config.eval.problems);
        let mut all: Vec<Option<EvalProblem>> = heldout.into_iter().map(Some).collect();
        let heldout: Vec<EvalProblem> = picked.into_iter().filter_map(|i| all[i].take()).collect();
        let trainer = Self {
            rng: state.as_ref().map_or_else(
                || ChaCha8Rng::seed_from_u64(config.seed),
                |s| s.rng.restore(),
            ),
            step: state.as_ref().map_or(0, |s| s.step),
            policy_version: state.as_ref().map_or(0, |s| s.policy_version),
            dp: DataParallel::single(device),
            config,
            models,
            tokenizer,
            tokenizer_dir: start.tokenizer_dir.clone(),
            heldout,
            grading: Grading::default(),
            paths,
            started: Instant::now(),
            history,
            tensorboard: None,
        };
        Ok((
            trainer,
            state.as_ref().map(SchedulerState::from_trainer_state),
        ))
    }

    /// Joins this rank to its data-parallel group `comm` (see [`DataParallel::attach`]).
    pub fn join(&mut self, comm: Box<dyn Collective>, config: ParallelConfig) -> Result<()> {
        self.dp = DataParallel::attach(&mut self.models, comm, config)?;
        Ok(())
    }

    /// The run's files.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// Whether every configured step is done.
    pub fn finished(&self) -> bool {
        self.step >= self.config.steps
    }

    /// Sampling parameters of rollouts for the current policy version.
    pub fn rollout_params(&self) -> SamplingParams {
        rollout_params(&self.config.rollout, self.models.policy.eos_token_ids())
    }

    /// The KV cache budget of the policy's sampling now: `learner.memory.kv_cache_gib`, else
    /// the device's default, measured at each call (the learner's memory changes between
    /// evaluations: optimizer state appears at the first update).
    pub fn kv_budget(&self) -> Result<KvBudget> {
        let device = self.models.policy.model.device();
        Ok(KvBudget::resolve(self.config.memory.kv_cache_gib, device)?)
    }

    /// One PRIME iteration on `batch`; bumps the policy version, appends to `metrics.jsonl`,
    /// and evaluates and checkpoints on schedule (the checkpoint needs `scheduler`'s state).
    pub fn train(
        &mut self,
        batch: Batch,
        rollout_seconds: f64,
        scheduler: impl Fn() -> SchedulerState,
    ) -> Result<StepRecord> {
        let clock = Instant::now();
        let groups: Vec<ScoredGroup> = batch.groups.iter().map(|g| g.scored.clone()).collect();
        self.tell_followers(Command::Step {
            iteration: self.step,
            groups: groups.clone(),
        })?;
        let metrics = prime_step(
            &mut self.models,
            &mut self.dp,
            &groups,
            &self.config,
            self.step,
        )?;
        self.step += 1;
        self.policy_version += 1;
        let sampled: usize = batch
            .groups
            .iter()
            .flat_map(|g| &g.scored.responses)
            .map(|r| r.ids.len())
            .sum();
        let train_seconds = clock.elapsed().as_secs_f64();
        let seconds = train_seconds + rollout_seconds;
        let versions = batch.groups.iter().map(|g| g.policy_version);
        let record = StepRecord {
            step: self.step,
            policy_version: batch.policy_version,
            group_versions: [
                versions.clone().min().unwrap_or(batch.policy_version),
                versions.max().unwrap_or(batch.policy_version),
            ],
            wall_seconds: self.started.elapsed().as_secs_f64(),
            rollout_seconds,
            train_seconds,
            groups_seen: batch.stats.groups_seen,
            filter_pass_rate: batch.stats.pass_rate,
            train_reward: batch.stats.mean_score,
            tokens_per_second: sampled as f64 / seconds.max(1e-9),
            metrics,
        };
        self.append(Record::Step(Box::new(record.clone())))?;
        let every = self.config.eval.every;
        if self.finished() || (every > 0 && self.step.is_multiple_of(every)) {
            self.evaluate()?;
        }
        let every = self.config.checkpoint.every;
        if self.finished() || (every > 0 && self.step.is_multiple_of(every)) {
            self.save_checkpoint(&scheduler())?;
        }
        Ok(record)
    }

    /// Held-out accuracy of the current policy, recorded in the history.
    pub fn evaluate(&mut self) -> Result<Evaluation> {
        let seed = self.config.seed.wrapping_add(1_000_003 * self.step);
        let wall_seconds = self.started.elapsed().as_secs_f64();
        let mut evaluation = evaluate(
            &self.models.policy,
            &self.tokenizer,
            &self.heldout,
            &self.config.eval,
            self.config.rollout.max_response_tokens,
            seed,
            self.kv_budget()?,
            &mut self.grading,
        )?;
        evaluation.wall_seconds = wall_seconds;
        tracing::info!(
            step = self.step,
            accuracy = evaluation.accuracy,
            greedy = evaluation.greedy_accuracy,
            "held-out evaluation"
        );
        self.append(Record::Eval {
            step: self.step,
            evaluation: evaluation.clone(),
        })?;
        Ok(evaluation)
    }

    /// With data parallelism, sends `command` to the other ranks (see
    /// [`crate::parallel::follow`]); alone, does nothing.
    pub fn tell_followers(&mut self, command: Command) -> Result<()> {
        if self.dp.world_size() > 1 {
            self.dp.exchange(Some(&command))?;
        }
        Ok(())
    }

    /// Writes a checkpoint of everything a resume needs. With a sharded optimizer the other
    /// ranks first send their shards, so the checkpoint has the unsharded format.
    pub fn save_checkpoint(&mut self, scheduler: &SchedulerState) -> Result<PathBuf> {
        if self.dp.zero1() {
            self.tell_followers(Command::Checkpoint)?;
        }
        let optimizers = [Trained::Policy, Trained::Prm]
            .map(|which| self.dp.full_optimizer(&self.models, which));
        match optimizers {
            [Ok(policy_optimizer), Ok(prm_optimizer)] => {
                self.write_checkpoint(scheduler, &policy_optimizer, &prm_optimizer)
            }
            [Err(e), _] | [_, Err(e)] => Err(e),
        }
    }

    fn write_checkpoint(
        &self,
        scheduler: &SchedulerState,
        policy_optimizer: &AdamW,
        prm_optimizer: &AdamW,
    ) -> Result<PathBuf> {
        let mut state = TrainerState {
            step: self.step,
            policy_version: self.policy_version,
            data_cursor: 0,
            data_epoch: 0,
            rng: RngState::capture(&self.rng),
            surplus_prompts: Vec::new(),
            extra: serde_json::json!({}),
        };
        scheduler.write_into(&mut state);
        let dir = checkpoint::save(
            &self.paths.checkpoints(),
            &CheckpointParts {
                policy: &self.models.policy,
                prm: &self.models.prm,
                policy_optimizer,
                prm_optimizer,
                tokenizer_dir: Some(&self.tokenizer_dir),
                state: &state,
            },
            self.config.checkpoint.keep,
        )?;
        tracing::info!(dir = %dir.display(), step = self.step, "checkpoint written");
        Ok(dir)
    }

    fn append(&mut self, record: Record) -> Result<()> {
        let path = self.paths.metrics();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(LearnerError::io(&path))?;
        let line = serde_json::to_string(&record).expect("records serialise");
        writeln!(file, "{line}").map_err(LearnerError::io(&path))?;
        if self.tensorboard.is_none() {
            self.tensorboard = Some(EventWriter::create(&self.paths.tensorboard())?);
        }
        let (step, scalars) = record.scalars();
        if let Some(writer) = self.tensorboard.as_mut() {
            writer.scalars(step, &scalars)?;
        }
        self.history.push(record);
        Ok(())
    }
}

/// The records of `metrics.jsonl` up to and including `step` (a resumed run drops what the
/// crashed run wrote after its last checkpoint).
fn read_history(path: &Path, step: u64) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LearnerError::io(path)(e)),
    };
    let mut records = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(record) = serde_json::from_str::<Record>(line) else {
            tracing::warn!(line, "skipping an unreadable metrics line");
            continue;
        };
        let at = match &record {
            Record::Step(r) => r.step,
            Record::Eval { step, .. } => *step,
        };
        if at <= step {
            records.push(record);
        }
    }
    Ok(records)
}

fn rewrite_history(path: &Path, records: &[Record]) -> Result<()> {
    let text: String = records
        .iter()
        .map(|r| serde_json::to_string(r).expect("records serialise") + "\n")
        .collect();
    std::fs::write(path, text).map_err(LearnerError::io(path))
}
