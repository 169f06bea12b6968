//! Weight broadcast: a new policy version delivered to N actors by the learner's broadcast
//! (`prime_learner::broadcast`, the TCP ring) against the fallback every actor has, N
//! concurrent `FetchWeights` streams, in one process on loopback.
//!
//! Per actor count N, one Learner service (the real handler and broadcaster) and N real
//! followers (`prime_actor::broadcast::Follower`) on one runtime, plus N plain clients with a
//! connection each. Each repeat times both paths back to back, so they see the same load:
//!
//! - gRPC: N threads each fetch the current version as an actor does (`open_transfer` +
//!   `receive_chunks`, every tensor's SHA-256 checked); from the start until all N verified.
//! - broadcast: with all N followers waiting, the learner publishes a new version (the same
//!   bytes under a new version number: nothing is re-encoded); N threads take it from their
//!   follower and check its SHA-256s as the actor does before applying; from the publish
//!   until all N verified.
//!
//! The first round of each path is timed and reported apart: for the broadcast it forms the
//! group (a new epoch: join listener, ranks, token handshake), for gRPC it opens the
//! connections. The later rounds reuse them, as a running learner does.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prime_actor::broadcast::{Delivered, Follower, FollowerConfig, Received};
use prime_learner::broadcast::{BroadcastHandle, BroadcastStats, Transport};
use prime_learner::config::WeightBroadcastConfig;
use prime_learner::service::Shared;
use prime_model::transfer::{open_transfer, receive_chunks, Published};
use prime_model::weights::{encode_var_store, DEFAULT_CHUNK_BYTES};
use prime_proto::client::{lazy_channel, learner_client};
use serde::Serialize;
use tch::Device;

use crate::error::{BenchError, Result};
use crate::learner_step::StepTimes;
use crate::machine::{cores, cpu_model, load_average};
use crate::python::TinyModel;
use crate::weight_sync::{connect, fetch, random_model, runtime, serve, LearnerClient};

/// Longest a round of either path may take before the benchmark gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(120);

/// The shared token of the benchmark's group (checked when members join a group).
const TOKEN: &str = "prime-bench-weight-broadcast";

/// What `prime bench weight-broadcast` runs.
#[derive(Debug, Clone, Serialize)]
pub struct BroadcastSettings {
    /// Shape of the random model whose weights are sent.
    pub model: TinyModel,
    /// Actor counts, one learner and group each.
    pub members: Vec<usize>,
    /// Timed rounds per path after the first.
    pub repeats: usize,
}

/// Both paths for one actor count.
#[derive(Debug, Clone, Serialize)]
pub struct BroadcastRow {
    /// Actors receiving each version.
    pub members: usize,
    /// N concurrent `FetchWeights`, start to all N verified; first round excluded.
    pub grpc: StepTimes,
    /// Publish to all N followers' copies verified, in the group of the first round.
    pub broadcast: StepTimes,
    /// The first gRPC round (its connections opened).
    pub grpc_first_seconds: f64,
    /// The first broadcast round, which forms the group (a new epoch).
    pub group_formation_seconds: f64,
    /// Bytes each actor received per second, medians.
    pub grpc_gb_per_s: f64,
    pub broadcast_gb_per_s: f64,
    /// gRPC's median over the broadcast's (above 1: the broadcast is faster).
    pub speedup: f64,
    /// Bytes the learner sent per round, the first included: what the N streams delivered
    /// verified, and the broadcaster's own count (`BroadcastStats::bytes_sent`).
    pub grpc_bytes_sent: Vec<u64>,
    pub broadcast_bytes_sent: Vec<u64>,
    /// Groups the broadcaster formed over all rounds (1: every later round kept the first).
    pub groups: u64,
}

/// What `prime bench weight-broadcast` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BroadcastReport {
    pub settings: BroadcastSettings,
    /// Bytes of one version (f32 weights).
    pub bytes: u64,
    /// Encoding and hashing the weights once on the learner (outside every round).
    pub encode_seconds: f64,
    pub rows: Vec<BroadcastRow>,
    /// CPU model and logical cores.
    pub cpu: String,
    pub cores: usize,
    /// 1-minute load average before and after.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl BroadcastReport {
    /// A plain-text table: the setting, the machine, then one row per actor count.
    pub fn table(&self) -> String {
        let m = &self.settings.model;
        let load = |v: Option<f64>| v.map_or_else(|| "?".into(), |v| format!("{v:.2}"));
        let mb = |b: u64| b as f64 / 1e6;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "weight broadcast over loopback: {:.1} MB of f32 weights (random Qwen2: vocab {}, hidden {}, {} layers, intermediate {}) to N actors; median of {} rounds after the first",
            mb(self.bytes), m.vocab, m.hidden, m.layers, m.intermediate, self.settings.repeats
        );
        let _ = writeln!(
            out,
            "machine: {}, {} cores, load {} -> {}; encoding + hashing once on the learner: {:.3} s",
            self.cpu,
            self.cores,
            load(self.load_before),
            load(self.load_after),
            self.encode_seconds
        );
        let _ = writeln!(
            out,
            "| N | FetchWeights x N s | GB/s per actor | broadcast s | GB/s per actor | speed-up | learner sent MB (gRPC / broadcast) | first round s (gRPC / forming the group) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let sent = |all: &[u64]| all.last().copied().map_or(0.0, mb);
            let _ = writeln!(
                out,
                "| {} | {:.4} | {:.3} | {:.4} | {:.3} | {:.2}x | {:.1} / {:.1} | {:.4} / {:.4} |",
                row.members,
                row.grpc.seconds,
                row.grpc_gb_per_s,
                row.broadcast.seconds,
                row.broadcast_gb_per_s,
                row.speedup,
                sent(&row.grpc_bytes_sent),
                sent(&row.broadcast_bytes_sent),
                row.grpc_first_seconds,
                row.group_formation_seconds
            );
        }
        out
    }
}

/// Runs both paths for every actor count in `settings`.
pub fn run_broadcast_bench(settings: &BroadcastSettings) -> Result<BroadcastReport> {
    if settings.repeats == 0 {
        return Err(BenchError::Settings("need at least one repeat".into()));
    }
    if settings.members.is_empty() || settings.members.contains(&0) {
        return Err(BenchError::Settings(
            "--members needs actor counts of at least 1".into(),
        ));
    }
    let load_before = load_average();
    let source = random_model(&settings.model)?;
    let started = Instant::now();
    let first = Published::new(encode_var_store(&source, 1, None)?);
    let encode_seconds = started.elapsed().as_secs_f64();
    drop(source);
    let bytes = first.bytes.len() as u64;
    let runtime = runtime()?;
    let mut rows = Vec::with_capacity(settings.members.len());
    for &members in &settings.members {
        let mut bench = Bench::start(&runtime, republish(&first, 1), members)?;
        rows.push(bench.run(members, settings.repeats, bytes)?);
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(BroadcastReport {
        settings: settings.clone(),
        bytes,
        encode_seconds,
        rows,
        cpu: cpu_model(),
        cores: cores(),
        load_before,
        load_after: load_average(),
    })
}

/// `published`'s bytes as `version`: the checksums hold for the same bytes, so nothing is
/// re-encoded between rounds.
fn republish(published: &Published, version: u64) -> Published {
    let mut manifest = published.manifest.clone();
    manifest.policy_version = version;
    Published {
        policy_version: version,
        manifest,
        bytes: published.bytes.clone(),
    }
}

/// One learner with its broadcaster, its N followers and N plain clients.
struct Bench<'a> {
    /// Runs the service, the followers' long polls and the clients' streams.
    runtime: &'a tokio::runtime::Runtime,
    /// The service's state: publishing here starts a round.
    shared: Arc<Shared>,
    /// The broadcaster; stopped (its thread joined) when the bench stops.
    broadcasting: Option<BroadcastHandle>,
    /// Stops the service.
    server: Option<tokio::sync::oneshot::Sender<()>>,
    /// One per actor, each waiting for the next round.
    followers: Vec<Follower>,
    /// One per actor, each on a connection of its own.
    clients: Vec<LearnerClient>,
}

impl<'a> Bench<'a> {
    /// Serves `first` on a loopback port with a TCP broadcaster, and starts `members`
    /// followers and clients.
    fn start(
        runtime: &'a tokio::runtime::Runtime,
        first: Published,
        members: usize,
    ) -> Result<Self> {
        let shared = Shared::serving_weights(first)?;
        // Every round waits for all members before it is published, so the window only
        // matters if one is late: then the round goes on without it and the benchmark fails.
        let config = WeightBroadcastConfig {
            enabled: true,
            join_window_ms: 500,
            join_timeout_seconds: 30,
            timeout_seconds: ROUND_LIMIT.as_secs(),
            ..WeightBroadcastConfig::default()
        };
        let broadcasting = shared
            .start_broadcast(
                config,
                Transport::Tcp,
                [127, 0, 0, 1].into(),
                Some(TOKEN.into()),
            )
            .map_err(|source| BenchError::Io {
                path: "weight broadcast thread".into(),
                source,
            })?;
        let (addr, server) = runtime.block_on(serve(shared.clone()))?;
        let mut bench = Self {
            runtime,
            shared,
            broadcasting: Some(broadcasting),
            server: Some(server),
            followers: Vec::with_capacity(members),
            clients: Vec::with_capacity(members),
        };
        for member in 0..members {
            bench.followers.push(bench.follower(addr, member)?);
            bench.clients.push(runtime.block_on(connect(addr))?);
        }
        Ok(bench)
    }

    /// A follower of the learner at `addr`, as an actor starts it.
    fn follower(&self, addr: SocketAddr, member: usize) -> Result<Follower> {
        let channel = {
            let _guard = self.runtime.enter();
            lazy_channel(
                "learner",
                &format!("http://{addr}"),
                Duration::from_secs(5),
                Some(TOKEN),
            )?
        };
        Ok(Follower::start(
            FollowerConfig {
                member_id: format!("actor-{member}"),
                learner_host: "127.0.0.1".into(),
                device: Device::Cpu,
                token: Some(TOKEN.into()),
            },
            learner_client(channel),
            self.runtime.handle().clone(),
        )?)
    }

    /// The first round of each path, then `repeats` rounds of each, taking turns.
    fn run(&mut self, members: usize, repeats: usize, bytes: u64) -> Result<BroadcastRow> {
        let (mut grpc, mut broadcast) = (Vec::new(), Vec::new());
        let (mut grpc_sent, mut broadcast_sent) = (Vec::new(), Vec::new());
        let mut version = self.shared.published().policy_version;
        for _ in 0..=repeats {
            let (seconds, sent) = self.grpc_round(version)?;
            grpc.push(seconds);
            grpc_sent.push(sent);
            version += 1;
            let (seconds, sent) = self.broadcast_round(version)?;
            broadcast.push(seconds);
            broadcast_sent.push(sent);
        }
        let (grpc_first_seconds, group_formation_seconds) = (grpc.remove(0), broadcast.remove(0));
        let (grpc, broadcast) = (StepTimes::new(grpc), StepTimes::new(broadcast));
        let gb = |t: &StepTimes| bytes as f64 / t.seconds / 1e9;
        Ok(BroadcastRow {
            members,
            grpc_gb_per_s: gb(&grpc),
            broadcast_gb_per_s: gb(&broadcast),
            speedup: grpc.seconds / broadcast.seconds,
            grpc,
            broadcast,
            grpc_first_seconds,
            group_formation_seconds,
            grpc_bytes_sent: grpc_sent,
            broadcast_bytes_sent: broadcast_sent,
            groups: self.stats().groups,
        })
    }

    /// Every client fetches `version` on a thread of its own; returns the seconds until all
    /// verified it and the bytes they received.
    fn grpc_round(&self, version: u64) -> Result<(f64, u64)> {
        let handle = self.runtime.handle();
        let started = Instant::now();
        let received = std::thread::scope(|scope| {
            let actors: Vec<_> = self
                .clients
                .iter()
                .map(|client| scope.spawn(move || fetch_verified(handle, client.clone(), version)))
                .collect();
            join_all(actors)
        })?;
        Ok((started.elapsed().as_secs_f64(), received))
    }

    /// Publishes `version` once every follower waits for it; returns the seconds until all
    /// of them took it and verified it, and the bytes the broadcaster counted for the round.
    fn broadcast_round(&self, version: u64) -> Result<(f64, u64)> {
        let members = self.followers.len();
        let before = self.wait_for("every follower waiting", |s| s.waiting == members)?;
        let next = republish(&self.shared.published(), version);
        let started = Instant::now();
        self.shared.publish(next);
        std::thread::scope(|scope| {
            let actors: Vec<_> = self
                .followers
                .iter()
                .map(|follower| scope.spawn(move || take_verified(follower, version)))
                .collect();
            join_all(actors)
        })?;
        let seconds = started.elapsed().as_secs_f64();
        // The learner counts the round when its send returns, which can be just after the
        // last member received it.
        let after = self.wait_for("the round counted", |s| {
            s.rounds > before.rounds || s.failed_rounds > before.failed_rounds
        })?;
        if after.failed_rounds > before.failed_rounds {
            return Err(BenchError::Service(format!(
                "the broadcast of version {version} failed on the learner"
            )));
        }
        Ok((seconds, after.bytes_sent - before.bytes_sent))
    }

    /// The broadcaster's figures now.
    fn stats(&self) -> BroadcastStats {
        self.broadcasting
            .as_ref()
            .expect("running until dropped")
            .broadcaster()
            .stats()
    }

    /// The broadcaster's figures once `done` holds for them (at most [`ROUND_LIMIT`]).
    fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&BroadcastStats) -> bool,
    ) -> Result<BroadcastStats> {
        let started = Instant::now();
        loop {
            let stats = self.stats();
            if done(&stats) {
                return Ok(stats);
            }
            if started.elapsed() > ROUND_LIMIT {
                return Err(BenchError::Service(format!(
                    "timed out waiting for {what}: {stats:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Bench<'_> {
    /// Stops the followers, then the broadcaster and the service.
    fn drop(&mut self) {
        // Followers first: they would otherwise back off against a learner that is gone.
        self.followers.clear();
        if let Some(broadcasting) = self.broadcasting.take() {
            if broadcasting.stop().is_err() {
                tracing::warn!("the benchmark's broadcast thread panicked");
            }
        }
        if let Some(server) = self.server.take() {
            let _ = server.send(());
        }
    }
}

/// Joins the actors' threads: the sum of what they received, or the first error.
fn join_all(actors: Vec<std::thread::ScopedJoinHandle<'_, Result<u64>>>) -> Result<u64> {
    let mut total = 0;
    for actor in actors {
        total += actor
            .join()
            .map_err(|_| BenchError::Service("an actor thread panicked".into()))??;
    }
    Ok(total)
}

/// One actor's fetch of `version` over gRPC, checked as the actor checks it; returns the
/// bytes received.
fn fetch_verified(
    runtime: &tokio::runtime::Handle,
    mut client: LearnerClient,
    version: u64,
) -> Result<u64> {
    let mut assembler = runtime.block_on(async move {
        let mut stream = fetch(&mut client, version).await?;
        let mut assembler = open_transfer(&mut stream, version).await?;
        receive_chunks(&mut stream, &mut assembler, DEFAULT_CHUNK_BYTES).await?;
        Ok::<_, BenchError>(assembler)
    })?;
    assembler.verify()?;
    Ok(assembler.received_bytes())
}

/// One actor's copy of `version` from its follower, checked as the actor checks it before
/// applying; returns its bytes. Before the follower is in a group `take` answers at once
/// (an actor would fetch over gRPC), so this asks again every millisecond until the round
/// reaches it.
fn take_verified(follower: &Follower, version: u64) -> Result<u64> {
    let stop = AtomicBool::new(false);
    let failures = follower.rounds().1;
    let started = Instant::now();
    let Delivered { manifest, bytes } = loop {
        if let Some(delivered) = follower.take(version, ROUND_LIMIT, ROUND_LIMIT, &stop) {
            break delivered;
        }
        if follower.rounds().1 > failures || started.elapsed() > ROUND_LIMIT {
            return Err(BenchError::Service(format!(
                "version {version} did not arrive by broadcast (follower rounds {:?})",
                follower.rounds()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let Received::Host(mut assembler) = bytes else {
        return Err(BenchError::Service(
            "a TCP broadcast arrived outside host memory".into(),
        ));
    };
    debug_assert_eq!(assembler.manifest(), &manifest);
    assembler.verify()?;
    Ok(assembler.received_bytes())
}
