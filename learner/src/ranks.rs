//! One learner process: a rank of the learner group. [`run_rank`] finds the rank from the
//! environment (`WORLD_SIZE`, `RANK` or a StatefulSet ordinal in `HOSTNAME`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`, `PRIME_GROUP_EPOCH`), joins the group, and then either
//! serves actors, trains, publishes and writes the run's outputs (rank 0), or follows rank
//! 0's steps while answering health checks (the others).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use prime_collective::{Collective, RankInfo};
use prime_model::memory::{decide, gib, Decision};
use prime_model::parse_device;
use prime_proto::auth::{ListenOptions, ServerAuth};
use tch::Device;

use crate::config::{LearnerConfig, ParallelConfig, RunConfig};
use crate::error::{LearnerError, Result};
use crate::eval::CodeGrading;
use crate::models::PrimeModels;
use crate::parallel::{join_group, Command, DataParallel, Trained};
use crate::plan::{checked_learner_plan, Shapes};
use crate::report::{plot_run, summarize, Summary};
use crate::run::{open_follower, open_run_grading};
use crate::service::run_learner;
use crate::step::prime_step;
use crate::trainer::Trainer;

/// This process in the learner group.
pub struct Rank {
    /// Which rank, of how many, and where rank 0 is.
    pub info: RankInfo,
    /// The device it computes on (`cuda` means `cuda:LOCAL_RANK`).
    pub device: Device,
    /// The joined group, with more than one rank.
    pub group: Option<Box<dyn Collective>>,
}

impl Rank {
    /// This rank's data-parallel group for `models`: the joined group (weights and optimizer
    /// state synchronised from rank 0), or a group of one.
    pub fn data_parallel(
        &mut self,
        models: &mut PrimeModels,
        parallel: &ParallelConfig,
    ) -> Result<DataParallel> {
        match self.group.take() {
            Some(group) => DataParallel::attach(models, group, parallel.clone()),
            None => Ok(DataParallel::single(self.device)),
        }
    }
}

/// Finds this process's rank and joins its group (`device`: `cpu`, `cuda`, `cuda:N` or
/// `auto`; `cuda`, and `auto` on a machine with CUDA, mean the device of `LOCAL_RANK`).
pub fn join_ranks(device: &str, parallel: &ParallelConfig) -> Result<Rank> {
    let info = RankInfo::from_env()?;
    let device = match parse_device(device)? {
        Device::Cuda(0) if device == "cuda" || device == "auto" => {
            prime_model::check_device(Device::Cuda(info.local_rank))?
        }
        d => d,
    };
    if info.world_size == 1 {
        return Ok(Rank {
            info,
            device,
            group: None,
        });
    }
    let epoch = match std::env::var("PRIME_GROUP_EPOCH") {
        Ok(v) => v.parse().map_err(|_| LearnerError::Config {
            path: "PRIME_GROUP_EPOCH".into(),
            message: format!("{v:?} is not a number"),
        })?,
        Err(_) => 0,
    };
    tracing::info!(
        rank = info.rank,
        world_size = info.world_size,
        master = %info.master(),
        epoch,
        "joining the learner group"
    );
    let group = join_group(&info, parallel, device, epoch)?;
    Ok(Rank {
        info,
        device,
        group: Some(group),
    })
}

/// How a learner rank runs, besides its config.
#[derive(Debug)]
pub struct RankOptions {
    /// Run directory: metrics.jsonl, checkpoints/, plots, summary.json.
    pub run_dir: PathBuf,
    /// Where rank 0 serves the Learner API (the other ranks: grpc.health.v1 only).
    pub listen: ListenOptions,
    /// Continue from the latest checkpoint in the run directory, if there is one.
    pub resume: bool,
    /// Where rank 0 writes its bound gRPC address once listening (for launchers).
    pub addr_file: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// gRPC URL of a Verifier service that grades held-out code (with the listen options'
    /// token); `None` grades it in this process's sandbox.
    pub verifier: Option<String>,
    /// TLS towards an `https://` verifier URL.
    pub verifier_tls: prime_proto::auth::ClientTls,
    /// Start even when the memory plan says the rank does not fit its GPU (`--force`).
    pub force: bool,
}

/// Runs this process's rank of the learner until the configured steps are done. Rank 0
/// returns the run's summary (plots and `summary.json` written); the others `None`.
pub fn run_rank(config: &RunConfig, options: &RankOptions) -> Result<Option<Summary>> {
    let parallel = &config.learner.parallel;
    let mut rank = join_ranks(&options.device, parallel)?;
    check_memory_plan(config, &options.run_dir, &rank, options.force)?;
    if rank.info.rank > 0 {
        // Followers serve no Learner API, only grpc.health.v1, so one probe fits every rank.
        let _health = serve_follower_health(options.listen.listen, &options.listen.auth)?;
        let mut models = open_follower(config, &options.run_dir, rank.device)?;
        let mut dp = rank.data_parallel(&mut models, parallel)?;
        let steps = follow(&mut models, &mut dp, &config.learner)?;
        tracing::info!(rank = rank.info.rank, steps, "rank 0 stopped the group");
        return Ok(None);
    }
    let run_dir = &options.run_dir;
    std::fs::create_dir_all(run_dir).map_err(LearnerError::io(run_dir))?;
    let saved = run_dir.join("config.toml");
    std::fs::write(&saved, config.to_toml()).map_err(LearnerError::io(&saved))?;
    let code = match &options.verifier {
        Some(url) => CodeGrading::Service {
            url: url.clone(),
            token: options.listen.auth.token.clone(),
            tls: options.verifier_tls.clone(),
        },
        None => CodeGrading::InProcess,
    };
    let (mut trainer, scheduler) =
        open_run_grading(config, run_dir, rank.device, options.resume, code)?;
    if let Some(group) = rank.group.take() {
        trainer.join(group, parallel.clone())?;
    }
    let trainer = run_learner(
        trainer,
        scheduler,
        &options.listen,
        |addr| write_addr_file(options.addr_file.as_deref(), addr),
        |record, _| {
            tracing::info!(
                step = record.step,
                reward = record.train_reward,
                pass_rate = record.filter_pass_rate,
                prm_accuracy = record.metrics.prm_accuracy,
                "step"
            );
        },
    )?;
    finish_run(&trainer, config, run_dir).map(Some)
}

/// On CUDA, the memory plan of this rank (`crate::plan`, the one `prime plan` prints) against
/// the device's memory, before any weight is loaded: a plan that does not fit is refused with
/// its numbers and the keys to change, unless `force`. Every rank plans as rank 0, which also
/// evaluates. A start model that is not there yet is left to the run's own error.
fn check_memory_plan(config: &RunConfig, run_dir: &Path, rank: &Rank, force: bool) -> Result<()> {
    let Device::Cuda(index) = rank.device else {
        return Ok(());
    };
    let shapes = match Shapes::of_run(config, run_dir) {
        Ok(shapes) => shapes,
        Err(LearnerError::Data(reason)) => {
            tracing::warn!(%reason, "no memory plan before the start model exists");
            return Ok(());
        }
        Err(other) => return Err(other),
    };
    let (_, total) = prime_model::device::cuda_memory(index)?;
    let world = rank.info.world_size as u64;
    let plan = checked_learner_plan(&config.learner, &shapes, world, total);
    match decide(&plan, force) {
        Decision::Fits => {
            tracing::info!(
                planned_gib = %gib(plan.total_bytes()),
                device_gib = %gib(total),
                "the memory plan fits"
            );
            Ok(())
        }
        Decision::Forced(message) => {
            tracing::warn!("{message}; starting anyway (--force)");
            Ok(())
        }
        Decision::Refused(message) => Err(LearnerError::MemoryPlan(message)),
    }
}

/// Writes the bound address to `path` (through a temporary file, so a reader never sees
/// half of it); a failure is logged, not fatal.
fn write_addr_file(path: Option<&Path>, addr: SocketAddr) {
    let Some(path) = path else { return };
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, addr.to_string()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), "cannot write the address file: {e}");
    }
}

/// Writes the run's plots and `summary.json`, and returns the summary.
pub fn finish_run(trainer: &Trainer, config: &RunConfig, run_dir: &Path) -> Result<Summary> {
    plot_run(run_dir, &trainer.history);
    let estimator = match config.learner.algo.estimator {
        prime_algo::Estimator::Prime => "prime",
        prime_algo::Estimator::Rloo => "rloo",
    };
    let summary = summarize(
        &trainer.history,
        estimator,
        config.learner.eval.samples,
        config.learner.eval.temperature,
    )?;
    let path = run_dir.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("a summary serialises") + "\n";
    std::fs::write(&path, text).map_err(LearnerError::io(&path))?;
    Ok(summary)
}

/// The loop of a rank other than 0: runs each step rank 0 announces and takes part in its
/// checkpoints, until rank 0 says stop (or the group fails). Returns the steps taken.
pub fn follow(
    models: &mut PrimeModels,
    dp: &mut DataParallel,
    config: &LearnerConfig,
) -> Result<u64> {
    let mut steps = 0;
    // ZeRO-3: rank 0 holds the models it publishes whole between steps (see Trainer::join).
    let device = models.policy.model.device();
    dp.gather_outputs(device)?;
    loop {
        match dp.exchange(None)? {
            Command::Step { iteration, groups } => {
                dp.release_outputs();
                prime_step(models, dp, &groups, config, iteration)?;
                dp.gather_outputs(device)?;
                steps += 1;
            }
            Command::Checkpoint => {
                for which in [Trained::Policy, Trained::Prm] {
                    dp.contribute_full_optimizer(models, which)?;
                }
            }
            Command::Stop => return Ok(steps),
        }
    }
}

/// Serves `grpc.health.v1` (with the rank's TLS) on `listen` from a thread of its own,
/// reporting `prime.v1.Learner` as serving while this follower rank lives.
fn serve_follower_health(
    listen: SocketAddr,
    auth: &ServerAuth,
) -> Result<std::thread::JoinHandle<()>> {
    let builder = auth.tls.apply(tonic::transport::Server::builder())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LearnerError::io("tokio runtime"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(LearnerError::io(format!(
            "follower health endpoint on {listen}"
        )))?;
    let bound = listener
        .local_addr()
        .map_err(LearnerError::io(listen.to_string()))?;
    tracing::info!(addr = %bound, "follower rank: grpc.health.v1 only");
    Ok(std::thread::spawn(move || {
        runtime.block_on(async move {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("prime.v1.Learner", tonic_health::ServingStatus::Serving)
                .await;
            let incoming = prime_proto::transport::incoming(listener);
            let mut builder = builder;
            if let Err(e) = builder
                .add_service(health)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::warn!(error = %e, "follower health endpoint stopped");
            }
        });
    }))
}
