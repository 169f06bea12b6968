//! `prime train --config FILE`: the product's main job on one machine. Runs the supervised
//! warm-up when its checkpoint is missing, then starts a verifier, a learner (or
//! `--learners N` data-parallel ranks) and N actors as separate `prime` processes talking
//! gRPC on loopback (or everything in this process with `--local`), shows progress, and
//! leaves plots, `metrics.jsonl` and `summary.json` in the run dir, whose path it prints.
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use prime_learner::checkpoint::sft_checkpoint;
use prime_learner::data::{RunData, DATA_SUMMARY_FILE};
use prime_learner::report::{summary_table, Summary};
use prime_learner::run::{open_run, run_local};
use prime_learner::trainer::{Record, StepRecord};
use prime_learner::RunConfig;
use prime_model::parse_device;

use crate::progress::step_bar;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `--set learner.algo.estimator=rloo` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run directory (world/, sft/, metrics.jsonl, checkpoints/, plots, summary.json, logs/).
    #[arg(long, default_value = "runs/demo")]
    pub run_dir: PathBuf,
    /// Rollout actors to start.
    #[arg(long, default_value_t = 2)]
    pub actors: usize,
    /// Data-parallel learner ranks to start, one process each (TCP backend on a CPU
    /// machine); rank 0 serves the actors.
    #[arg(
        long,
        default_value_t = 1,
        allow_hyphen_values = true,
        value_parser = prime_check::arg::at_least(1usize),
    )]
    pub learners: usize,
    /// Train in this one process (the learner samples its own rollouts) instead of starting
    /// services.
    #[arg(long)]
    pub local: bool,
    /// Continue from the latest checkpoint of the run directory.
    #[arg(long)]
    pub resume: bool,
    /// cpu, cuda, cuda:N or auto (cuda when a CUDA device is present, else cpu) (learner and actors).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Kills the service processes when dropped, so a failed run leaves nothing behind.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                tracing::debug!(%name, "stopping");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A free loopback port (bound, read, released).
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// A `prime` subprocess that dies with this process: on Linux the kernel sends it SIGKILL
/// when its parent exits for whatever reason (SIGKILL included), so no verifier, learner or
/// actor outlives the `prime train` that started it.
fn child_command() -> Result<Command> {
    let mut command = Command::new(std::env::current_exe().context("locating the prime binary")?);
    die_with_parent(&mut command);
    Ok(command)
}

#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody will signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// The environment every child runs with: the thread count (0 leaves it to torch) and a
/// passive OpenMP.
fn thread_env(command: &mut Command, threads: &str) {
    command.env("PRIME_THREADS", threads);
    if threads != "0" {
        // Without these, OpenMP worker threads may spin between parallel regions. In two
        // `make demo` runs the learner kept a core busy while the actors sampled, which made
        // rollouts about 3x slower on 2 cores.
        command
            .env("OMP_NUM_THREADS", threads)
            .env("OMP_WAIT_POLICY", "PASSIVE");
    }
}

fn spawn(name: &str, args: &[String], logs: &Path, threads: &str) -> Result<(String, Child)> {
    spawn_with_env(name, args, logs, threads, &[])
}

fn spawn_with_env(
    name: &str,
    args: &[String],
    logs: &Path,
    threads: &str,
    envs: &[(String, String)],
) -> Result<(String, Child)> {
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = child_command()?;
    command.args(args);
    thread_env(&mut command, threads);
    let child = command
        .env_remove("PRIME_TOKEN")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok((name.to_string(), child))
}

/// What a child's log says about its end: its error as the binary prints it (from `Error:` to
/// a backtrace, when `RUST_BACKTRACE` asked for one) when there is one, else the last lines.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let Some(from) = lines.iter().rposition(|l| l.starts_with("Error:")) else {
        return lines[lines.len().saturating_sub(15)..].join("\n");
    };
    lines[from..]
        .iter()
        .take_while(|l| !l.starts_with("Stack backtrace:"))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
}

/// The first child that has exited, except learner ranks above 0 that ended well (they stop
/// by themselves once rank 0 stops the group): its name and status.
fn exited_child(children: &mut Children) -> Result<Option<(String, std::process::ExitStatus)>> {
    for (name, child) in &mut children.0 {
        if let Some(status) = child.try_wait()? {
            if name.starts_with("learner-") && status.success() {
                continue;
            }
            return Ok(Some((name.clone(), status)));
        }
    }
    Ok(None)
}

/// The error of a child that ended the run, with what its log says.
/// Why the run stops: a child's exit, with the tail of its log; `prime train` then exits with
/// the child's class (a child's bad input or retryable failure is the run's).
fn child_failed(name: &str, status: std::process::ExitStatus, logs: &Path) -> anyhow::Error {
    let message = format!(
        "the {name} exited with {status}, so the run stops; from {}:\n{}",
        logs.join(format!("{name}.log")).display(),
        log_tail(&logs.join(format!("{name}.log")))
    );
    match status.code().map(crate::exit::class_of_status) {
        Some(crate::exit::ExitClass::BadInput) => crate::exit::BadInput(message).into(),
        Some(crate::exit::ExitClass::Retryable) => crate::exit::Retryable(message).into(),
        _ => anyhow::Error::msg(message),
    }
}

fn read_records(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn progress_message(step: Option<&StepRecord>, accuracy: Option<f64>) -> String {
    let accuracy = accuracy.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a));
    match step {
        Some(s) => format!(
            "reward {:.2} pass {:.0}% prm rank {} held-out {accuracy}",
            s.train_reward,
            100.0 * s.filter_pass_rate,
            s.metrics
                .prm_new_batch_ranking
                .map_or("-".into(), |r| format!("{r:.2}"))
        ),
        None => format!("collecting the first batch; held-out {accuracy}"),
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    // Everything the children would refuse is refused here first, before any process starts.
    let config = RunConfig::from_file_with_overrides(&args.config, &args.overrides)?;
    let device = parse_device(&args.device)?;
    if !args.local && args.actors == 0 {
        bail!("--actors must be at least 1 (or use --local)");
    }
    let run_dir = &args.run_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let config_path = run_dir.join("config.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let threads = std::env::var("PRIME_THREADS").unwrap_or_else(|_| "1".into());
    if config.model.path.is_none() && !sft_checkpoint(run_dir).join("config.json").exists() {
        eprintln!(
            "no warm-up checkpoint in {}: running the supervised warm-up first",
            run_dir.display()
        );
        // A process of its own, like every other role: the warm-up's torch state does not
        // stay behind in this process, which only supervises from here on.
        let mut warm_up = child_command()?;
        warm_up
            .args(["sft", "--config"])
            .arg(&config_path)
            .arg("--run-dir")
            .arg(run_dir)
            .args(["--device", &args.device]);
        thread_env(&mut warm_up, &threads);
        let status = warm_up.status().context("starting the warm-up")?;
        if !status.success() {
            bail!("the supervised warm-up failed ({status})");
        }
    }
    let started = Instant::now();
    // The learner writes this run's data summary as it opens the run; an older one must not
    // be shown in its place.
    let _ = std::fs::remove_file(run_dir.join(DATA_SUMMARY_FILE));
    if args.local {
        train_local(&config, &args, device)?;
    } else {
        train_services(&config_path, &config, &args, &threads)?;
    }
    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("summary.json")).context("reading summary.json")?,
    )?;
    eprintln!(
        "PRIME run finished in {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        summary_table(&summary)
    );
    // The paper's way of reading a run: start against final checkpoint, with the trained PRM
    // reranking each one's samples.
    let evaluation = prime_learner::eval::protocol::evaluate_run(&config, run_dir, device)
        .context("evaluating the start and final checkpoints")?;
    eprint!("{}", evaluation.table());
    println!("{}", run_dir.display());
    Ok(())
}

/// Prints the data summary the learner saved as it opened the run.
fn print_data_summary(run_dir: &Path) -> Result<()> {
    let data = RunData::load(run_dir).context("reading the learner's data summary")?;
    eprintln!("{}", data.lines().join("\n"));
    Ok(())
}

fn train_local(config: &RunConfig, args: &TrainArgs, device: tch::Device) -> Result<()> {
    if args.learners > 1 {
        bail!("--local trains in one process; --learners needs the services (drop --local)");
    }
    let (mut trainer, mut scheduler) = open_run(config, &args.run_dir, device, args.resume)?;
    print_data_summary(&args.run_dir)?;
    let bar = step_bar(config.learner.steps, "prime");
    bar.set_position(trainer.step);
    let mut accuracy = None;
    run_local(&mut trainer, &mut scheduler, None, |record, trainer| {
        if let Some(Record::Eval { evaluation, .. }) = trainer.history.last() {
            accuracy = Some(evaluation.accuracy);
        }
        bar.set_position(record.step);
        bar.set_message(progress_message(Some(record), accuracy));
    })?;
    bar.finish_and_clear();
    let summary = prime_learner::ranks::finish_run(&trainer, config, &args.run_dir)?;
    eprint!("{}", summary_table(&summary));
    Ok(())
}

fn train_services(
    config_path: &Path,
    config: &RunConfig,
    args: &TrainArgs,
    threads: &str,
) -> Result<()> {
    let run_dir = &args.run_dir;
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let addr_file = run_dir.join("learner.addr");
    let _ = std::fs::remove_file(&addr_file);
    let verifier_addr = free_port()?;
    eprintln!(
        "the loopback services run without a shared token (demo launcher); logs in {}",
        logs.display()
    );
    let s = |v: &str| v.to_string();
    let mut children = Children(Vec::new());
    children.0.push(spawn(
        "verifier",
        &[
            s("verifier"),
            s("serve"),
            s("--listen"),
            verifier_addr.to_string(),
        ],
        &logs,
        threads,
    )?);
    // Ranks above 0 serve only a health check (on a free loopback port) and announce no
    // address.
    let mut follower_args = vec![
        s("learner"),
        s("serve"),
        s("--config"),
        config_path.display().to_string(),
        s("--run-dir"),
        run_dir.display().to_string(),
        s("--device"),
        args.device.clone(),
        s("--listen"),
        s("127.0.0.1:0"),
    ];
    if args.resume {
        follower_args.push(s("--resume"));
    }
    let mut learner_args = follower_args.clone();
    // Rank 0 evaluates: held-out code rows go to the same verifier as the actors' rollouts.
    learner_args.extend([
        s("--addr-file"),
        addr_file.display().to_string(),
        s("--verifier"),
        format!("http://{verifier_addr}"),
    ]);
    // Every rank of one launch shares an epoch, so a rank left over from an earlier launch
    // cannot join this group.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let master_port = free_port()?.port();
    let rank_env = |rank: usize| -> Vec<(String, String)> {
        if args.learners == 1 {
            return Vec::new();
        }
        [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", args.learners.to_string()),
            ("MASTER_ADDR", s("127.0.0.1")),
            ("MASTER_PORT", master_port.to_string()),
            ("PRIME_GROUP_EPOCH", epoch.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    children.0.push(spawn_with_env(
        "learner",
        &learner_args,
        &logs,
        threads,
        &rank_env(0),
    )?);
    for rank in 1..args.learners {
        children.0.push(spawn_with_env(
            &format!("learner-{rank}"),
            &follower_args,
            &logs,
            threads,
            &rank_env(rank),
        )?);
    }
    let learner_addr = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            break text.trim().to_string();
        }
        if let Some((name, status)) = exited_child(&mut children)? {
            return Err(child_failed(&name, status, &logs));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print_data_summary(run_dir)?;
    let tokenizer = config
        .model
        .path
        .clone()
        .unwrap_or_else(|| sft_checkpoint(run_dir));
    // `[verifier] routes`: items of these data sources go to the verifiers named there.
    let routes: Vec<String> = config
        .verifier
        .routes
        .iter()
        .flat_map(|(source, url)| [s("--verifier-route"), format!("{source}={url}")])
        .collect();
    for i in 0..args.actors {
        let name = format!("actor-{i}");
        let mut actor_args = vec![
            s("actor"),
            s("run"),
            s("--learner"),
            format!("http://{learner_addr}"),
            s("--verifier"),
            format!("http://{verifier_addr}"),
            s("--tokenizer"),
            tokenizer.display().to_string(),
            s("--name"),
            name.clone(),
            s("--device"),
            args.device.clone(),
        ];
        actor_args.extend(routes.iter().cloned());
        children.0.push(spawn(&name, &actor_args, &logs, threads)?);
    }

    let bar = step_bar(config.learner.steps, "prime");
    let metrics = run_dir.join("metrics.jsonl");
    loop {
        // Any child that ends stops the run at once with its reason: the learner when it is
        // done (or failed), any other when it failed or refused its work.
        if let Some((name, status)) = exited_child(&mut children)? {
            if name == "learner" && status.success() {
                break;
            }
            bar.finish_and_clear();
            return Err(child_failed(&name, status, &logs));
        }
        let records = read_records(&metrics);
        let last_step = records.iter().rev().find_map(|r| match r {
            Record::Step(s) => Some(s.as_ref()),
            Record::Eval { .. } => None,
        });
        let accuracy = records.iter().rev().find_map(|r| match r {
            Record::Eval { evaluation, .. } => Some(evaluation.accuracy),
            Record::Step(_) => None,
        });
        bar.set_position(last_step.map_or(0, |s| s.step));
        bar.set_message(progress_message(last_step, accuracy));
        std::thread::sleep(Duration::from_millis(500));
    }
    bar.finish_and_clear();
    Ok(())
}
