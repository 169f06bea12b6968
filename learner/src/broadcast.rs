//! Weight broadcast: each new policy version pushed to the actors that follow the learner in
//! one collective broadcast, instead of every actor pulling the whole model over gRPC.
//!
//! With N actors, `FetchWeights` sends the model N times out of the learner; a broadcast
//! sends it once: the TCP ring forwards it member to member in pieces (the hops overlap), and
//! NCCL does the same between CUDA devices over NVLink or InfiniBand. A collective group has
//! fixed members while actors come and go, so the group is remade whenever its members
//! change:
//!
//! - each actor's follower long-polls `JoinWeightBroadcast` with the version it holds;
//! - when the compute loop publishes version V, the round waits (at most `join_window_ms`
//!   after the publish) for the last group's members to ask, then takes everyone waiting with
//!   an older version;
//! - the same members as the last group keep its epoch and communicator; other members start
//!   a new epoch: the learner binds a new join listener (TCP) or makes an NCCL id, answers
//!   every member with its rank, and all of them join;
//! - the learner, rank 0, broadcasts the bytes `FetchWeights` would stream; the manifest in
//!   each reply carries their SHA-256 checksums.
//!
//! A member that does not come back in time or fails is left out; its actor fetches that
//! version over gRPC, as does every actor while the broadcast is off or before its follower
//! is in a group. A failed round ends its group: the next round starts a new epoch.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prime_collective::bytecast::ByteCast;
use prime_collective::tcp::TcpOptions;
use prime_collective::RankInfo;
use prime_model::transfer::{manifest_to_proto, Published};
use prime_proto::v1 as pb;
use tch::Device;

use crate::config::{Backend, WeightBroadcastConfig};
use crate::error::{LearnerError, Result};

/// How the bytes travel, resolved for the learner's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The pipelined TCP ring (host memory).
    Tcp,
    /// NCCL from the learner's CUDA device `device`.
    Nccl {
        /// The learner's CUDA device index.
        device: usize,
    },
}

impl Transport {
    /// Picks the transport `backend` asks for on the learner's `device`.
    pub fn resolve(backend: Backend, device: Device) -> Result<Self> {
        if !backend.uses_nccl(device) {
            return Ok(Self::Tcp);
        }
        match device {
            Device::Cuda(device) if cfg!(feature = "nccl") => Ok(Self::Nccl { device }),
            _ => Err(LearnerError::Config {
                path: "learner.weight_broadcast.backend".into(),
                message: "\"nccl\" needs a CUDA learner and a build with the `nccl` feature".into(),
            }),
        }
    }

    /// The transport's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Nccl { .. } => "nccl",
        }
    }
}

impl From<Transport> for pb::BroadcastTransport {
    /// The transport as actors see it in `RegisterReply.weight_broadcast` and
    /// `BroadcastRound.backend`.
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Tcp => Self::Tcp,
            Transport::Nccl { .. } => Self::Nccl,
        }
    }
}

/// A long poll without a round answers "ask again" (version 0) after this long.
pub const LONG_POLL: Duration = Duration::from_secs(30);

/// Figures of the broadcast, for Prometheus.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BroadcastStats {
    /// Rounds whose broadcast completed.
    pub rounds: u64,
    /// Rounds that failed (a member missing or dead); their members fetched over gRPC.
    pub failed_rounds: u64,
    /// Groups formed so far (each a new epoch).
    pub groups: u64,
    /// Actors in the last round.
    pub members: usize,
    /// Bytes the learner sent in completed rounds (once per round, whatever the members).
    pub bytes_sent: u64,
    /// Seconds the last completed round took, joining included.
    pub last_round_seconds: f64,
    /// Followers waiting for the next round now.
    pub waiting: usize,
}

/// A follower waiting for its next round.
struct Waiter {
    ticket: u64,
    member_id: String,
    held_version: u64,
    reply: tokio::sync::oneshot::Sender<pb::BroadcastRound>,
}

struct State {
    latest: Arc<Published>,
    published_at: Instant,
    /// Version of the last round (at start, the first published version: never broadcast).
    last_round: u64,
    waiting: Vec<Waiter>,
    next_ticket: u64,
    /// Member ids of the live group, sorted (rank = index + 1); empty when there is none.
    group_members: Vec<String>,
    /// The live group's epoch. Epochs start at a random number, so a member still holding
    /// a group of a learner that restarted cannot mistake it for the new learner's.
    epoch: u64,
    stats: BroadcastStats,
    stop: bool,
}

/// The learner's side: membership, rounds, and the broadcasting thread.
pub struct Broadcaster {
    config: WeightBroadcastConfig,
    transport: Transport,
    /// Where a group's join listener binds (the learner's gRPC listen address's IP).
    bind_ip: IpAddr,
    token: Option<String>,
    state: Mutex<State>,
    wake: Condvar,
    /// Seconds of each completed round, forming the group included (for Prometheus).
    round_seconds: prime_proto::metrics::Histogram,
}

impl std::fmt::Debug for Broadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broadcaster")
            .field("transport", &self.transport)
            .field("stats", &self.stats())
            .finish()
    }
}

/// A running broadcaster; stopping or dropping it shuts the broadcaster down (its long polls
/// end at once, so do it before the gRPC server stops) and joins its thread.
#[derive(Debug)]
pub struct BroadcastHandle {
    broadcaster: Arc<Broadcaster>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BroadcastHandle {
    /// The broadcaster.
    pub fn broadcaster(&self) -> &Arc<Broadcaster> {
        &self.broadcaster
    }

    /// Shuts the broadcaster down and joins its thread; `Err` if the thread panicked.
    pub fn stop(mut self) -> std::thread::Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> std::thread::Result<()> {
        self.broadcaster.shutdown();
        self.thread
            .take()
            .map_or(Ok(()), std::thread::JoinHandle::join)
    }
}

impl Drop for BroadcastHandle {
    fn drop(&mut self) {
        if self.stop_thread().is_err() {
            tracing::warn!("the weight broadcast thread panicked");
        }
    }
}

/// Takes a waiter out of the queue when its call ends without a round (deadline or a
/// dropped connection).
struct Ticket<'a> {
    broadcaster: &'a Broadcaster,
    ticket: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.broadcaster
            .lock()
            .waiting
            .retain(|w| w.ticket != self.ticket);
    }
}

/// What members need to join a new group.
enum Rendezvous {
    Tcp(TcpListener),
    #[cfg(feature = "nccl")]
    Nccl(Vec<u8>),
}

impl Broadcaster {
    /// A broadcaster whose rounds start with the version after `first`.
    pub fn new(
        config: WeightBroadcastConfig,
        transport: Transport,
        bind_ip: IpAddr,
        token: Option<String>,
        first: Arc<Published>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            transport,
            bind_ip,
            token,
            state: Mutex::new(State {
                last_round: first.policy_version,
                latest: first,
                published_at: Instant::now(),
                waiting: Vec::new(),
                next_ticket: 0,
                group_members: Vec::new(),
                epoch: u64::from(rand::random::<u32>()),
                stats: BroadcastStats::default(),
                stop: false,
            }),
            wake: Condvar::new(),
            round_seconds: prime_proto::metrics::duration_histogram(),
        })
    }

    /// The transport, for `RegisterReply.weight_broadcast`.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the next version to the broadcasting thread.
    pub fn publish(&self, published: Arc<Published>) {
        let mut state = self.lock();
        state.latest = published;
        state.published_at = Instant::now();
        self.wake.notify_all();
    }

    /// Seconds of each completed round so far.
    pub fn round_seconds(&self) -> &prime_proto::metrics::Histogram {
        &self.round_seconds
    }

    /// The figures so far.
    pub fn stats(&self) -> BroadcastStats {
        let state = self.lock();
        BroadcastStats {
            waiting: state
                .waiting
                .iter()
                .filter(|w| !w.reply.is_closed())
                .count(),
            ..state.stats.clone()
        }
    }

    /// Ends the thread and answers every waiting call (with UNAVAILABLE).
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.stop = true;
        state.waiting.clear();
        self.wake.notify_all();
    }

    /// A broadcaster with its thread started; rounds start with the version after `current`,
    /// the one published now.
    pub fn start(
        config: WeightBroadcastConfig,
        transport: Transport,
        bind_ip: IpAddr,
        token: Option<String>,
        current: Arc<Published>,
    ) -> std::io::Result<BroadcastHandle> {
        let broadcaster = Self::new(config, transport, bind_ip, token, current);
        let thread = {
            let this = broadcaster.clone();
            std::thread::Builder::new()
                .name("weight-broadcast".into())
                .spawn(move || this.run())?
        };
        Ok(BroadcastHandle {
            broadcaster,
            thread: Some(thread),
        })
    }

    /// The `JoinWeightBroadcast` handler's work: waits for a round newer than the member's
    /// version (answering version 0 after [`LONG_POLL`]).
    pub async fn join(&self, request: pb::JoinBroadcastRequest) -> Result<pb::BroadcastRound> {
        if request.member_id.is_empty() || request.member_id.len() > 256 {
            return Err(LearnerError::InvalidRequest(
                "member_id must be 1 to 256 bytes long".into(),
            ));
        }
        if matches!(self.transport, Transport::Nccl { .. }) && !request.device.starts_with("cuda") {
            return Err(LearnerError::Precondition(format!(
                "the learner broadcasts weights over NCCL, which needs a CUDA device; this \
                 member receives on {:?}: fetch over gRPC",
                request.device
            )));
        }
        let (send, receive) = tokio::sync::oneshot::channel();
        let ticket = {
            let mut state = self.lock();
            if state.stop {
                return Err(LearnerError::Unavailable("the learner is stopping".into()));
            }
            state.next_ticket += 1;
            let ticket = state.next_ticket;
            // A member asking again replaces its earlier call.
            state.waiting.retain(|w| w.member_id != request.member_id);
            state.waiting.push(Waiter {
                ticket,
                member_id: request.member_id,
                held_version: request.held_version,
                reply: send,
            });
            self.wake.notify_all();
            Ticket {
                broadcaster: self,
                ticket,
            }
        };
        let answer = tokio::time::timeout(LONG_POLL, receive).await;
        drop(ticket);
        match answer {
            Ok(Ok(round)) => Ok(round),
            Ok(Err(_)) => Err(LearnerError::Unavailable(
                "the learner stopped or replaced this call before a round".into(),
            )),
            Err(_) => Ok(pb::BroadcastRound::default()),
        }
    }

    /// Waits until a round can start: a version newer than the last round, someone waiting
    /// for it, and the last group's members all back or the join window over. Takes the
    /// round's members out of the queue. `None` once stopped.
    fn next_round(&self) -> Option<(Arc<Published>, Vec<Waiter>, bool, u64)> {
        let window = Duration::from_millis(self.config.join_window_ms);
        let mut state = self.lock();
        loop {
            if state.stop {
                return None;
            }
            state.waiting.retain(|w| !w.reply.is_closed());
            let version = state.latest.policy_version;
            let wants = |w: &Waiter| w.held_version < version;
            if version > state.last_round && state.waiting.iter().any(wants) {
                let missing = state
                    .group_members
                    .iter()
                    .any(|m| !state.waiting.iter().any(|w| &w.member_id == m && wants(w)));
                let window_end = state.published_at + window;
                let now = Instant::now();
                if !missing || now >= window_end {
                    break;
                }
                state = self
                    .wake
                    .wait_timeout(state, window_end - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            } else {
                state = self
                    .wake
                    .wait_timeout(state, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let version = state.latest.policy_version;
        let (mut members, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiting)
            .into_iter()
            .partition(|w| w.held_version < version);
        state.waiting = rest;
        members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
        let ids: Vec<String> = members.iter().map(|w| w.member_id.clone()).collect();
        let new_group = ids != state.group_members;
        if new_group {
            state.stats.groups += 1;
            state.epoch += 1;
            state.group_members = ids;
        }
        state.last_round = version;
        state.stats.members = members.len();
        Some((state.latest.clone(), members, new_group, state.epoch))
    }

    /// The broadcasting thread: one round per published version, until shut down.
    fn run(&self) {
        let mut group: Option<ByteCast> = None;
        while let Some((published, members, new_group, epoch)) = self.next_round() {
            let started = Instant::now();
            let world_size = members.len() + 1;
            let version = published.policy_version;
            let outcome = self.round(
                &mut group, &published, members, epoch, new_group, world_size,
            );
            let mut state = self.lock();
            match outcome {
                Ok(()) => {
                    state.stats.rounds += 1;
                    state.stats.bytes_sent += published.bytes.len() as u64;
                    state.stats.last_round_seconds = started.elapsed().as_secs_f64();
                    self.round_seconds.observe(state.stats.last_round_seconds);
                    tracing::info!(
                        policy_version = version,
                        epoch,
                        members = world_size - 1,
                        new_group,
                        bytes = published.bytes.len(),
                        secs = started.elapsed().as_secs_f64(),
                        "broadcast weights"
                    );
                }
                Err(e) => {
                    group = None;
                    state.group_members.clear();
                    state.stats.failed_rounds += 1;
                    tracing::warn!(
                        policy_version = version,
                        epoch,
                        error = %e,
                        "weight broadcast failed; its members fetch over gRPC, the next round \
                         forms a new group"
                    );
                }
            }
        }
        drop(group);
    }

    /// Answers the members, forms the group when `new_epoch` says so, and broadcasts.
    fn round(
        &self,
        group: &mut Option<ByteCast>,
        published: &Published,
        members: Vec<Waiter>,
        epoch: u64,
        new_group: bool,
        world_size: usize,
    ) -> Result<()> {
        let join_timeout = Duration::from_secs(self.config.join_timeout_seconds);
        let timeout = Duration::from_secs(self.config.timeout_seconds);
        let rendezvous = if new_group {
            *group = None;
            Some(self.rendezvous()?)
        } else {
            None
        };
        let manifest = manifest_to_proto(&published.manifest);
        let mut template = pb::BroadcastRound {
            policy_version: published.policy_version,
            epoch,
            world_size: world_size as u32,
            backend: pb::BroadcastTransport::from(self.transport) as i32,
            manifest: Some(manifest),
            join_timeout_seconds: self.config.join_timeout_seconds as u32,
            timeout_seconds: self.config.timeout_seconds as u32,
            ..pb::BroadcastRound::default()
        };
        match &rendezvous {
            Some(Rendezvous::Tcp(listener)) => {
                template.port = u32::from(
                    listener
                        .local_addr()
                        .map_err(LearnerError::io("weight broadcast listener"))?
                        .port(),
                );
            }
            #[cfg(feature = "nccl")]
            Some(Rendezvous::Nccl(id)) => template.nccl_unique_id = id.clone().into(),
            None => {}
        }
        for (index, member) in members.into_iter().enumerate() {
            let round = pb::BroadcastRound {
                rank: index as u32 + 1,
                ..template.clone()
            };
            if member.reply.send(round).is_err() {
                tracing::warn!(member = %member.member_id, "a member left before its round");
            }
        }
        if let Some(rendezvous) = rendezvous {
            *group = Some(self.form(rendezvous, epoch, world_size, join_timeout, timeout)?);
        }
        let group = group.as_mut().expect("a group for the round");
        Ok(group.send(&published.bytes)?)
    }

    /// What the members of a new group need: a bound join listener or an NCCL id.
    fn rendezvous(&self) -> Result<Rendezvous> {
        match self.transport {
            Transport::Tcp => {
                let addr = SocketAddr::new(self.bind_ip, self.config.port);
                let listener = TcpListener::bind(addr).map_err(LearnerError::io(format!(
                    "weight broadcast listener {addr}"
                )))?;
                Ok(Rendezvous::Tcp(listener))
            }
            #[cfg(feature = "nccl")]
            Transport::Nccl { .. } => Ok(Rendezvous::Nccl(
                prime_collective::nccl::Nccl::load()?.unique_id()?,
            )),
            #[cfg(not(feature = "nccl"))]
            Transport::Nccl { .. } => Err(LearnerError::Config {
                path: "learner.weight_broadcast.backend".into(),
                message: "this build has no NCCL (the `nccl` feature)".into(),
            }),
        }
    }

    /// Joins the new group as rank 0.
    fn form(
        &self,
        rendezvous: Rendezvous,
        epoch: u64,
        world_size: usize,
        join_timeout: Duration,
        timeout: Duration,
    ) -> Result<ByteCast> {
        match rendezvous {
            Rendezvous::Tcp(listener) => {
                let info = RankInfo {
                    rank: 0,
                    world_size,
                    local_rank: 0,
                    master_addr: self.bind_ip.to_string(),
                    master_port: 0,
                };
                let options = TcpOptions {
                    join_timeout,
                    op_timeout: timeout,
                    epoch,
                    token: self.token.clone(),
                };
                Ok(ByteCast::join_tcp(&info, options, Some(listener))?)
            }
            #[cfg(feature = "nccl")]
            Rendezvous::Nccl(id) => {
                let Transport::Nccl { device } = self.transport else {
                    unreachable!("an NCCL id only for the NCCL transport");
                };
                Ok(ByteCast::join_nccl(&id, 0, world_size, device, timeout)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_follows_the_backend_and_the_device() {
        assert_eq!(
            Transport::resolve(Backend::Auto, Device::Cpu).unwrap(),
            Transport::Tcp
        );
        assert_eq!(
            Transport::resolve(Backend::Tcp, Device::Cuda(0)).unwrap(),
            Transport::Tcp
        );
        let nccl = Transport::resolve(Backend::Nccl, Device::Cpu).unwrap_err();
        assert!(nccl.to_string().contains("CUDA"), "{nccl}");
        let expected = if cfg!(feature = "nccl") {
            Transport::Nccl { device: 1 }
        } else {
            Transport::Tcp
        };
        assert_eq!(
            Transport::resolve(Backend::Auto, Device::Cuda(1)).unwrap(),
            expected
        );
    }

    fn published(version: u64) -> Arc<Published> {
        let tensors = vec![("w".to_string(), tch::Tensor::from_slice(&[1.0f32, 2.0]))];
        Arc::new(Published::new(
            prime_model::weights::encode_tensors(&tensors, version, None).unwrap(),
        ))
    }

    #[test]
    fn bad_join_requests_are_refused_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = WeightBroadcastConfig {
            enabled: true,
            ..WeightBroadcastConfig::default()
        };
        let ask = |transport, member_id: &str, device: &str| {
            let broadcaster = Broadcaster::new(
                config.clone(),
                transport,
                "127.0.0.1".parse().unwrap(),
                None,
                published(0),
            );
            let request = pb::JoinBroadcastRequest {
                member_id: member_id.into(),
                held_version: 0,
                device: device.into(),
            };
            runtime.block_on(broadcaster.join(request)).unwrap_err()
        };
        let empty = ask(Transport::Tcp, "", "cpu");
        assert!(matches!(empty, LearnerError::InvalidRequest(_)), "{empty}");
        let long = ask(Transport::Tcp, &"m".repeat(257), "cpu");
        assert!(matches!(long, LearnerError::InvalidRequest(_)), "{long}");
        let cpu = ask(Transport::Nccl { device: 0 }, "actor-1", "cpu");
        assert!(matches!(cpu, LearnerError::Precondition(_)), "{cpu}");
        assert!(cpu.to_string().contains("CUDA"), "{cpu}");
        // A stopped broadcaster takes no more members.
        let broadcaster = Broadcaster::new(
            config.clone(),
            Transport::Tcp,
            "127.0.0.1".parse().unwrap(),
            None,
            published(0),
        );
        broadcaster.shutdown();
        let request = pb::JoinBroadcastRequest {
            member_id: "actor-1".into(),
            held_version: 0,
            device: "cpu".into(),
        };
        let stopped = runtime.block_on(broadcaster.join(request)).unwrap_err();
        assert!(matches!(stopped, LearnerError::Unavailable(_)), "{stopped}");
    }

    #[test]
    fn config_defaults_and_refusals() {
        let config: WeightBroadcastConfig = toml::from_str("enabled = true").unwrap();
        assert!(config.enabled);
        assert_eq!(config.join_window_ms, 2000);
        assert_eq!(config.timeout_seconds, 120);
        config.validate().unwrap();
        let zero: WeightBroadcastConfig = toml::from_str("timeout_seconds = 0").unwrap();
        assert!(zero.validate().unwrap_err().contains("timeout_seconds"));
        let huge: WeightBroadcastConfig =
            toml::from_str("join_timeout_seconds = 5000000000").unwrap();
        assert!(huge
            .validate()
            .unwrap_err()
            .contains("join_timeout_seconds"));
        assert!(toml::from_str::<WeightBroadcastConfig>("enable = true").is_err());
    }
}
