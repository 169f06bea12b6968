//! Opening a PRIME run from its config (data, start models, scheduler, resume) and the
//! single-process loop that samples its own rollouts.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prime_model::Tokenizer;
use rand::Rng;
use tch::Device;

use crate::checkpoint::sft_checkpoint;
use crate::config::RunConfig;
use crate::error::{LearnerError, Result};
use crate::eval::{eval_problems, local_rollouts, prompts_from_rows};
use crate::models::PrimeModels;
use crate::scheduler::{Pull, Scheduler, SchedulerConfig};
use crate::trainer::{load_model, StartModels, StepRecord, Trainer};

/// Rows of `files`, or of the world's split `fallback` when no file is given.
fn read_rows(files: &[PathBuf], fallback: Option<PathBuf>) -> Result<Vec<prime_world::DataRow>> {
    let mut rows = Vec::new();
    if files.is_empty() {
        if let Some(path) = fallback {
            rows.extend(prime_world::read_rows(&path)?);
        }
    }
    for file in files {
        rows.extend(prime_world::read_rows(file)?);
    }
    Ok(rows)
}

/// Opens a run: builds (or reuses) the embedded world, loads the start models (the configured
/// model, else the run's supervised checkpoint), the prompts and the held-out set, and resumes
/// from the latest checkpoint when `resume` is set. A fresh run is evaluated once before its
/// first step.
pub fn open_run(
    config: &RunConfig,
    run_dir: &Path,
    device: Device,
    resume: bool,
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
    let train_rows = read_rows(&learner.data.train_files, world_file(|w| &w.rl.parquet))?;
    let (prompts, dropped) =
        prompts_from_rows(&train_rows, &tokenizer, learner.data.max_prompt_tokens)?;
    if dropped > 0 {
        tracing::warn!(
            dropped,
            kept = prompts.len(),
            max_prompt_tokens = learner.data.max_prompt_tokens,
            "prompts over the length limit dropped"
        );
    }
    let heldout = eval_problems(
        &read_rows(
            &learner.data.heldout_files,
            world_file(|w| &w.heldout.parquet),
        )?,
        &tokenizer,
    )?;
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
            max_outstanding_prompts: 0,
            vocab_size: trainer.models.policy.config.vocab_size,
            max_response_tokens: learner.rollout.max_response_tokens,
        },
        resumed,
    )?;
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
    let round = (trainer.config.rollout.batch_prompts as f64 * trainer.config.rollout.oversample)
        .ceil() as usize;
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
        let groups = local_rollouts(
            &trainer.models.policy,
            &trainer.tokenizer,
            &items,
            &trainer.rollout_params(),
            policy_version,
            &actor,
            seed,
        )?;
        for group in groups {
            scheduler.submit(group, Instant::now());
        }
    }
    Ok(())
}
