//! Following the learner's weight broadcast (see `prime_learner::broadcast`): a thread of its
//! own long-polls `JoinWeightBroadcast`, joins the round's group when its epoch is new, and
//! receives each new version into a buffer while the compute thread samples. The compute
//! thread then takes the version a batch needs from here, or fetches it over gRPC when no
//! round brings it (the follower is not in a group yet, was left out, or the round failed).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prime_collective::bytecast::{ByteCast, Receiver};
use prime_collective::tcp::TcpOptions;
use prime_collective::RankInfo;
use prime_model::transfer::manifest_from_proto;
use prime_model::weights::{WeightAssembler, WeightManifest};
use prime_proto::client::{request, with_deadline, LearnerClient};
use prime_proto::v1 as pb;
use tch::Device;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::error::{ActorError, Result};

/// Deadline of one long poll; the learner answers "ask again" after 30 s.
const POLL_DEADLINE: Duration = Duration::from_secs(45);

/// The bytes of a version, where the broadcast left them.
#[derive(Debug)]
pub enum Received {
    /// Host memory (the TCP ring): the pieces as they arrived, each tensor's SHA-256 computed
    /// on background threads while the rest arrived; applying waits for the last check.
    Host(WeightAssembler),
    /// A `uint8` tensor on the actor's CUDA device (NCCL).
    Device(tch::Tensor),
}

/// One version received by broadcast, waiting to be applied.
#[derive(Debug)]
pub struct Delivered {
    /// Layout and hashes of the bytes.
    pub manifest: WeightManifest,
    /// The bytes.
    pub bytes: Received,
}

#[derive(Debug, Default)]
struct State {
    /// Newest version received (0: none).
    held: u64,
    /// The last round this follower took part in succeeded: it is in a group, so the round
    /// of the next version will come to it.
    in_group: bool,
    /// The version of the round being received.
    receiving: Option<u64>,
    /// The newest version received and not yet taken.
    delivered: Option<Delivered>,
    /// The follower ended (the learner offers no broadcast, or it was stopped).
    ended: bool,
    /// Rounds received, and rounds that failed.
    rounds: u64,
    failures: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// What the follower needs to know.
#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// Names this process to the learner for its whole life.
    pub member_id: String,
    /// Host the learner's gRPC service is reached at (the TCP group's listener is there too).
    pub learner_host: String,
    /// Where the weights are received: NCCL needs the CUDA device the policy samples on.
    pub device: Device,
    /// The shared token, proven to the group's other members when joining.
    pub token: Option<String>,
}

/// The following thread and what it has received.
#[derive(Debug)]
pub struct Follower {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Starts following the learner behind `client`, whose calls run on `runtime`.
    pub fn start(
        config: FollowerConfig,
        client: LearnerClient,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("weight-follower".into())
                .spawn(move || follow(&config, client, &runtime, &shared))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the follower still follows (it ends when the learner offers no broadcast).
    pub fn is_following(&self) -> bool {
        !self.shared.lock().ended
    }

    /// Rounds received so far, and rounds that failed.
    pub fn rounds(&self) -> (u64, u64) {
        let state = self.shared.lock();
        (state.rounds, state.failures)
    }

    /// The weights of `version` once the broadcast brings them: at once when received, after
    /// the round when one for it is being received (for at most `limit`), and after waiting
    /// up to `expect` for a round to start when the follower is in a group and received the
    /// version before (its learner broadcasts each version right after publishing it; a
    /// follower whose rounds stopped coming waits once, not at every version). `None`: fetch
    /// over gRPC.
    pub fn take(
        &self,
        version: u64,
        expect: Duration,
        limit: Duration,
        stop: &AtomicBool,
    ) -> Option<Delivered> {
        let started = Instant::now();
        let mut state = self.shared.lock();
        loop {
            if state
                .delivered
                .as_ref()
                .is_some_and(|d| d.manifest.policy_version == version)
            {
                return state.delivered.take();
            }
            let waited = started.elapsed();
            let worth_waiting = match state.receiving {
                Some(v) => v == version && waited < limit,
                None => {
                    state.in_group && !state.ended && state.held + 1 == version && waited < expect
                }
            };
            if !worth_waiting || stop.load(Ordering::Relaxed) {
                return None;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// How long dropping a follower waits for its thread; one in the middle of joining a group or
/// of a broadcast is left to end at its own deadline rather than holding up the actor's exit.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl Drop for Follower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let started = Instant::now();
            while !thread.is_finished() && started.elapsed() < STOP_WAIT {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                debug!("the weight follower is mid-round; not waiting for it");
            }
        }
    }
}

/// The thread: poll, join, receive, until stopped or the learner offers no broadcast.
fn follow(
    config: &FollowerConfig,
    mut client: LearnerClient,
    runtime: &tokio::runtime::Handle,
    shared: &Shared,
) {
    let mut group: Option<(u64, ByteCast)> = None;
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let device = crate::run::device_name(config.device);
    while !shared.stop.load(Ordering::Relaxed) {
        let message = pb::JoinBroadcastRequest {
            member_id: config.member_id.clone(),
            held_version: shared.lock().held,
            device: device.clone(),
        };
        let call = with_deadline("Learner", "JoinWeightBroadcast", POLL_DEADLINE, async {
            let call = client.join_weight_broadcast(request(message, POLL_DEADLINE));
            call.await.map(tonic::Response::into_inner)
        });
        let answer = runtime.block_on(async {
            tokio::select! {
                answer = call => Some(answer),
                () = async {
                    while !shared.stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } => None,
            }
        });
        let round = match answer {
            None => break,
            Some(Ok(round)) if round.policy_version == 0 => continue,
            Some(Ok(round)) => round,
            Some(Err(e))
                if matches!(
                    e.code(),
                    Some(tonic::Code::FailedPrecondition | tonic::Code::Unimplemented)
                ) =>
            {
                info!(error = %e, "no weight broadcast for this actor; fetching over gRPC");
                break;
            }
            Some(Err(e)) => {
                if e.code() != Some(tonic::Code::DeadlineExceeded) {
                    // The learner is away: whatever group there was is gone with it.
                    group = None;
                    shared.update(|s| s.in_group = false);
                    let delay = backoff.next_delay();
                    debug!(error = %e, ?delay, "JoinWeightBroadcast failed; asking again");
                    std::thread::sleep(delay);
                }
                continue;
            }
        };
        backoff.reset();
        let version = round.policy_version;
        shared.update(|s| s.receiving = Some(version));
        let started = Instant::now();
        match receive(config, &mut group, round) {
            Ok(delivered) => {
                let bytes = delivered.manifest.total_bytes;
                shared.update(|s| {
                    s.held = version;
                    s.in_group = true;
                    s.receiving = None;
                    s.rounds += 1;
                    s.delivered = Some(delivered);
                });
                info!(
                    policy_version = version,
                    bytes,
                    secs = started.elapsed().as_secs_f64(),
                    "received weights by broadcast"
                );
            }
            Err(e) => {
                group = None;
                shared.update(|s| {
                    s.in_group = false;
                    s.receiving = None;
                    s.failures += 1;
                });
                warn!(policy_version = version, error = %e, "weight broadcast failed; this version comes over gRPC");
            }
        }
    }
    shared.update(|s| s.ended = true);
}

/// Takes part in one round: joins its group when the epoch is new, then receives the bytes.
fn receive(
    config: &FollowerConfig,
    group: &mut Option<(u64, ByteCast)>,
    mut round: pb::BroadcastRound,
) -> Result<Delivered> {
    let manifest = manifest_from_proto(
        round
            .manifest
            .take()
            .ok_or_else(|| ActorError::Protocol("a broadcast round without a manifest".into()))?,
    );
    if manifest.policy_version != round.policy_version {
        return Err(ActorError::Protocol(format!(
            "a broadcast round of version {} carries the manifest of version {}",
            round.policy_version, manifest.policy_version
        )));
    }
    let (rank, world_size) = (round.rank as usize, round.world_size as usize);
    if rank == 0 || rank >= world_size {
        return Err(ActorError::Protocol(format!(
            "broadcast rank {rank} is not in 1..{world_size}"
        )));
    }
    let total = usize::try_from(manifest.total_bytes)
        .map_err(|_| ActorError::Protocol("a transfer larger than memory".into()))?;
    // Refuses an inconsistent manifest before joining; starts the hashing threads.
    let assembler = WeightAssembler::new(manifest.clone())?;
    if group
        .as_ref()
        .is_none_or(|(epoch, _)| *epoch != round.epoch)
    {
        *group = None;
        *group = Some((round.epoch, join(config, &round, rank, world_size)?));
    }
    let (_, group) = group.as_mut().expect("joined above");
    let bytes = match group.device() {
        Some(device) => {
            let mut buffer =
                tch::Tensor::zeros([total as i64], (tch::Kind::Uint8, Device::Cuda(device)));
            group.receive(total, Receiver::Device(&mut buffer))?;
            Received::Device(buffer)
        }
        None => Received::Host(receive_checked(group, assembler, total)?),
    };
    Ok(Delivered { manifest, bytes })
}

/// Receives `total` host bytes and feeds each piece to `assembler` as it arrives, so the
/// hashes are computed while the rest is on its way. A piece the assembler refuses (a hash
/// already known to be wrong) does not stop the broadcast, which the members after this one
/// still need; the refusal is the result once it has ended.
fn receive_checked(
    group: &mut ByteCast,
    mut assembler: WeightAssembler,
    total: usize,
) -> Result<WeightAssembler> {
    let version = assembler.manifest().policy_version;
    let mut offset = 0u64;
    let mut refused = None;
    group.receive(
        total,
        Receiver::Host(&mut |piece: Vec<u8>| {
            let len = piece.len() as u64;
            if refused.is_none() {
                if let Err(e) = assembler.push(version, offset, Bytes::from(piece)) {
                    refused = Some(e);
                }
            }
            offset += len;
        }),
    )?;
    match refused {
        Some(e) => Err(e.into()),
        None => Ok(assembler),
    }
}

/// A limit the learner sent, in seconds (a learner that sent none: 2 minutes).
fn round_seconds(seconds: u32) -> Duration {
    Duration::from_secs(if seconds == 0 { 120 } else { seconds.into() })
}

/// Joins the group of a new epoch as `rank`.
fn join(
    config: &FollowerConfig,
    round: &pb::BroadcastRound,
    rank: usize,
    world_size: usize,
) -> Result<ByteCast> {
    let limit = round_seconds(round.timeout_seconds);
    match pb::BroadcastTransport::try_from(round.backend) {
        Ok(pb::BroadcastTransport::Tcp) => {
            let info = RankInfo {
                rank,
                world_size,
                local_rank: 0,
                master_addr: config.learner_host.clone(),
                master_port: u16::try_from(round.port).map_err(|_| {
                    ActorError::Protocol(format!("broadcast port {} out of range", round.port))
                })?,
            };
            let options = TcpOptions {
                join_timeout: round_seconds(round.join_timeout_seconds),
                op_timeout: limit,
                epoch: round.epoch,
                token: config.token.clone(),
            };
            Ok(ByteCast::join_tcp(&info, options, None)?)
        }
        #[cfg(feature = "nccl")]
        Ok(pb::BroadcastTransport::Nccl) => {
            let Device::Cuda(device) = config.device else {
                return Err(ActorError::Protocol(
                    "an NCCL broadcast round for an actor that samples on the CPU".into(),
                ));
            };
            Ok(ByteCast::join_nccl(
                &round.nccl_unique_id,
                rank,
                world_size,
                device,
                limit,
            )?)
        }
        other => Err(ActorError::Protocol(format!(
            "the learner broadcasts over transport {} ({other:?}), which this build does not \
             speak",
            round.backend
        ))),
    }
}
