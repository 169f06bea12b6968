//! Opening a PRIME run from its config (data, start models, scheduler, resume) and the
//! single-process loop that samples its own rollouts.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prime_model::Tokenizer;
use rand::Rng;
use tch::Device;

use crate::checkpoint::sft_checkpoint;
use crate::config::{DataConfig, RunConfig};
use crate::data::{prepare_with, Prepared, RunData, DATA_SUMMARY_FILE};
use crate::error::{LearnerError, Result};
use crate::eval::{local_rollouts, CodeGrading, Grading};
use crate::models::PrimeModels;
use crate::scheduler::{Pull, Scheduler, SchedulerConfig};
use crate::trainer::{load_model, StartModels, StepRecord, Trainer};

/// `files`, or the world's split `fallback` when no file is given.
fn data_files(files: &[PathBuf], fallback: Option<PathBuf>) -> Vec<PathBuf> {
    if files.is_empty() {
        fallback.into_iter().collect()
    } else {
        files.to_vec()
    }
}

/// Prepares the training and held-out prompts of a run ([`crate::data::prepare`]: bad rows
/// skipped and counted or fatal as `learner.data.on_bad_row` says, prompts over
/// `learner.data.max_prompt_tokens` dropped and counted, both splits alike), logs their
/// summaries and saves them as [`DATA_SUMMARY_FILE`] in the run dir.
pub fn prepare_run_data(
    data: &DataConfig,
    train_files: &[PathBuf],
    heldout_files: &[PathBuf],
    tokenizer: &Tokenizer,
    run_dir: &Path,
) -> Result<(Prepared, Prepared)> {
    let train = prepare_with(train_files, tokenizer, data)?;
    let heldout = prepare_with(heldout_files, tokenizer, data)?;
    let summaries = RunData {
        max_prompt_tokens: data.max_prompt_tokens,
        train: train.summary.clone(),
        heldout: heldout.summary.clone(),
    };
    for line in summaries.lines() {
        tracing::info!("{line}");
    }
    summaries.save(run_dir)?;
    if train.rows.is_empty() {
        let names: Vec<String> = train_files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        return Err(LearnerError::Data(format!(
            "no training prompt is left in {}: {} rows, {} too long (over \
             learner.data.max_prompt_tokens = {}), {} bad (the first named in {})",
            names.join(", "),
            train.summary.rows,
            train.summary.too_long,
            data.max_prompt_tokens,
            train.summary.bad.count,
            run_dir.join(DATA_SUMMARY_FILE).display()
        )));
    }
    if heldout.rows.is_empty() {
        tracing::warn!("no held-out prompt is left: evaluations have no problems");
    }
    Ok((train, heldout))
}

/// Opens a run: builds (or reuses) the embedded world, loads the start models (the configured
/// model, else the run's supervised checkpoint), prepares the prompts and the held-out set
/// (their summaries logged and saved as [`DATA_SUMMARY_FILE`] in the run dir), and resumes
/// from the latest checkpoint when `resume` is set. A fresh run is evaluated once before its
/// first step. Code is graded in this process ([`open_run_grading`] says otherwise).
pub fn open_run(
    config: &RunConfig,
    run_dir: &Path,
    device: Device,
    resume: bool,
) -> Result<(Trainer, Scheduler)> {
    open_run_grading(config, run_dir, device, resume, CodeGrading::InProcess)
}

/// [`open_run`], grading held-out code (and local rollouts' code) as `code` says.
pub fn open_run_grading(
    config: &RunConfig,
    run_dir: &Path,
    device: Device,
    resume: bool,
    code: CodeGrading,
) -> Result<(Trainer, Scheduler)> {
    let learner = &config.learner;
    // The embedded world is built (or reused) only when the run uses a part of it.
    let needs_world = learner.data.train_files.is_empty()
        || learner.data.heldout_files.is_empty()
        || config.model.path.is_none();
    let world = if needs_world {
        Some(prime_world::build_world(
            &config.world,
            &run_dir.join("world"),
        )?)
    } else {
        None
    };
    let world_file =
        |pick: fn(&prime_world::WorldFiles) -> &Path| world.as_ref().map(|w| pick(w).to_path_buf());
    let policy = match &config.model.path {
        Some(path) => path.clone(),
        None => sft_checkpoint(run_dir),
    };
    if !policy.join("config.json").exists() {
        return Err(LearnerError::Data(format!(
            "no start model at {}: run the supervised warm-up (`prime sft`) or set model.path",
            policy.display()
        )));
    }
    let tokenizer_dir = match world_file(|w| &w.tokenizer_dir) {
        Some(dir) if !policy.join("tokenizer.json").exists() => dir,
        _ => policy.clone(),
    };
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;
    let (train, heldout) = prepare_run_data(
        &learner.data,
        &data_files(&learner.data.train_files, world_file(|w| &w.rl.parquet)),
        &data_files(
            &learner.data.heldout_files,
            world_file(|w| &w.heldout.parquet),
        ),
        &tokenizer,
        run_dir,
    )?;
    let (prompts, heldout) = (train.prompts(), heldout.eval_problems());
    let start = StartModels {
        policy,
        prm: learner.prm_path.clone(),
        tokenizer_dir,
    };
    let (mut trainer, resumed) =
        Trainer::open(learner.clone(), &start, heldout, run_dir, device, resume)?;
    let scheduler = Scheduler::new(
        prompts,
        SchedulerConfig {
            batch_groups: learner.rollout.batch_prompts,
            k: learner.rollout.samples_per_prompt,
            max_staleness: learner.rollout.max_staleness,
            lease: Duration::from_secs(learner.rollout.lease_seconds),
            filter: learner.algo.filter.clone(),
            seed: learner.seed,
            oversample: learner.rollout.oversample,
            max_outstanding_prompts: 0,
            vocab_size: trainer.models.policy.config.vocab_size,
            max_response_tokens: learner.rollout.max_response_tokens,
        },
        resumed,
    )?;
    trainer.grading = Grading::new(code);
    if trainer.history.is_empty() {
        trainer.evaluate()?;
    }
    Ok((trainer, scheduler))
}

/// The models of a data-parallel rank other than 0, loaded from the run's start models
/// (the configured model, else the run's supervised checkpoint) only for their shapes:
/// attaching the rank to its group ([`crate::parallel::DataParallel::attach`]) overwrites
/// weights and optimizer state with rank 0's, a resumed checkpoint's included.
pub fn open_follower(config: &RunConfig, run_dir: &Path, device: Device) -> Result<PrimeModels> {
    let learner = &config.learner;
    learner.validate().map_err(LearnerError::Data)?;
    let policy_dir = config
        .model
        .path
        .clone()
        .unwrap_or_else(|| sft_checkpoint(run_dir));
    if !policy_dir.join("config.json").exists() {
        return Err(LearnerError::Data(format!(
            "no start model at {} for this rank (every rank reads the start model)",
            policy_dir.display()
        )));
    }
    let prm_dir = learner
        .prm_path
        .clone()
        .unwrap_or_else(|| policy_dir.clone());
    let kind = learner.memory.param_dtype.kind();
    let reference = match learner.algo.reference {
        prime_algo::ReferenceType::Freeze => Some(load_model(&prm_dir, device, kind)?),
        prime_algo::ReferenceType::Policy => None,
    };
    Ok(PrimeModels::new(
        load_model(&policy_dir, device, kind)?,
        load_model(&prm_dir, device, kind)?,
        reference,
        learner,
    ))
}

/// Trains in one process: the learner samples its own rollouts through the same scheduler
/// (work, filter, surplus), so a run is deterministic and resumes exactly. Stops after
/// `max_steps` more steps (or when the config's steps are done).
pub fn run_local(
    trainer: &mut Trainer,
    scheduler: &mut Scheduler,
    max_steps: Option<u64>,
    mut on_step: impl FnMut(&StepRecord, &Trainer),
) -> Result<()> {
    let actor = scheduler.register("local", Instant::now());
    let target = max_steps.map_or(trainer.config.steps, |n| {
        (trainer.step + n).min(trainer.config.steps)
    });
    let round = scheduler.round();
    let mut collecting_since = Instant::now();
    while trainer.step < target {
        if let Some(batch) = scheduler.take_batch() {
            let rollout_seconds = collecting_since.elapsed().as_secs_f64();
            let state = scheduler.state();
            let record = trainer.train(batch, rollout_seconds, || state.clone())?;
            scheduler.publish(trainer.policy_version);
            on_step(&record, trainer);
            collecting_since = Instant::now();
            continue;
        }
        let pull = scheduler.pull(&actor, round, Instant::now());
        let Pull::Work {
            policy_version,
            items,
        } = pull
        else {
            return Err(LearnerError::Data(
                "the scheduler has no work to hand out and no batch to train on".into(),
            ));
        };
        let seed: u64 = trainer.rng.gen();
        let kv_budget = trainer.kv_budget()?;
        let groups = local_rollouts(
            &trainer.models.policy,
            &trainer.tokenizer,
            &items,
            &trainer.rollout_params(),
            policy_version,
            &actor,
            seed,
            kv_budget,
            &mut trainer.grading,
        )?;
        for group in groups {
            scheduler.submit(group, Instant::now());
        }
    }
    Ok(())
}
