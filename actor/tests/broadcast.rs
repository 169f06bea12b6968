//! The weight broadcast end to end over loopback: a real Learner gRPC service with its
//! broadcaster, real actor followers, TCP groups. Checks what members receive (bit-identical
//! to what `FetchWeights` serves, applicable to a model), when groups are kept and re-formed
//! (same members: same epoch; a member gone or new: a new epoch), that a member that never
//! joins fails the round for everyone without hanging anyone and the next round recovers,
//! and that a learner without the broadcast makes followers stop at once.
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{runtime, tiny_model, torch_rng};
use prime_actor::broadcast::{Delivered, Follower, FollowerConfig, Received};
use prime_learner::broadcast::{BroadcastHandle, BroadcastStats, Transport};
use prime_learner::config::WeightBroadcastConfig;
use prime_learner::service::{LearnerService, Shared};
use prime_model::transfer::Published;
use prime_model::weights::encode_var_store;
use prime_model::CausalLm;
use prime_proto::client::{lazy_channel, learner_client, request};
use prime_proto::v1 as pb;
use tch::Device;

const TOKEN: &str = "s3cret-s3cret-s3cret";

fn publish(lm: &CausalLm, version: u64) -> Published {
    Published::new(encode_var_store(&lm.vs, version, None).unwrap())
}

/// A learner service on a loopback port, with a broadcaster when `broadcast` is given.
struct Learner {
    shared: Arc<Shared>,
    broadcaster: Option<BroadcastHandle>,
    url: String,
}

impl Learner {
    fn start(
        runtime: &tokio::runtime::Runtime,
        first: Published,
        broadcast: Option<WeightBroadcastConfig>,
    ) -> Self {
        let shared = Shared::serving_weights(first).unwrap();
        let broadcaster = broadcast.map(|config| {
            let ip = "127.0.0.1".parse().unwrap();
            shared
                .start_broadcast(config, Transport::Tcp, ip, Some(TOKEN.into()))
                .unwrap()
        });
        let url = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let service = LearnerService::server(shared.clone());
            tokio::spawn(async move {
                let incoming = prime_proto::transport::incoming(listener);
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
                    .unwrap();
            });
            url
        });
        Self {
            shared,
            broadcaster,
            url,
        }
    }

    fn stats(&self) -> BroadcastStats {
        self.broadcaster.as_ref().unwrap().broadcaster().stats()
    }

    /// Waits until `done` holds for the broadcast figures (at most 30 s).
    fn wait_for(&self, what: &str, done: impl Fn(&BroadcastStats) -> bool) -> BroadcastStats {
        wait_until(what, || {
            let stats = self.stats();
            done(&stats).then_some(stats)
        })
    }

    fn follower(&self, runtime: &tokio::runtime::Runtime, name: &str) -> Follower {
        let channel = {
            let _guard = runtime.enter();
            lazy_channel("learner", &self.url, Duration::from_secs(5), Some(TOKEN)).unwrap()
        };
        Follower::start(
            FollowerConfig {
                member_id: name.into(),
                learner_host: "127.0.0.1".into(),
                device: Device::Cpu,
                token: Some(TOKEN.into()),
            },
            learner_client(channel),
            runtime.handle().clone(),
        )
        .unwrap()
    }
}

impl Drop for Learner {
    fn drop(&mut self) {
        if let Some(broadcaster) = self.broadcaster.take() {
            broadcaster.stop().unwrap();
        }
    }
}

fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Takes `version` from `follower` and checks it is the learner's published bytes, then
/// applies it through the hash-checking assembler to a model, which must equal `source`.
fn check_delivered(follower: &Follower, version: u64, published: &Published, source: &CausalLm) {
    let stop = AtomicBool::new(false);
    let Delivered { manifest, bytes } = follower
        .take(
            version,
            Duration::from_secs(10),
            Duration::from_secs(30),
            &stop,
        )
        .unwrap_or_else(|| panic!("version {version} did not arrive by broadcast"));
    assert_eq!(manifest, published.manifest);
    let Received::Host(assembler) = bytes else {
        panic!("a TCP broadcast lands in host memory");
    };
    // Every piece arrived and every tensor matched its hash (the check ran as they came);
    // the f32 model built from them equals the source bit for bit.
    assert_eq!(assembler.received_bytes(), published.bytes.len() as u64);
    let target = tiny_model(99);
    assert_eq!(assembler.apply(&target.vs).unwrap(), version);
    for (name, expected) in source.vs.variables() {
        let got = &target.vs.variables()[&name];
        assert!(got.equal(&expected), "{name} differs after applying");
    }
}

/// Publishes `source` as `version`, waits until the learner has counted `rounds` completed
/// rounds, and checks that every follower received and applies it.
fn broadcast_round(
    learner: &Learner,
    followers: &[Follower],
    source: &CausalLm,
    version: u64,
    rounds: u64,
) -> BroadcastStats {
    let published = publish(source, version);
    learner.shared.publish(publish(source, version));
    let stats = learner.wait_for("the round", |s| s.rounds == rounds);
    for follower in followers {
        check_delivered(follower, version, &published, source);
    }
    stats
}

#[test]
fn members_receive_each_version_and_groups_follow_membership() {
    let _rng = torch_rng();
    let runtime = runtime();
    let models: Vec<CausalLm> = (0..7).map(tiny_model).collect();
    let config = WeightBroadcastConfig {
        enabled: true,
        join_window_ms: 300,
        join_timeout_seconds: 3,
        timeout_seconds: 3,
        ..WeightBroadcastConfig::default()
    };
    let learner = Learner::start(&runtime, publish(&models[0], 0), Some(config));
    let mut followers: Vec<Follower> = ["a", "b", "c"]
        .iter()
        .map(|name| learner.follower(&runtime, name))
        .collect();
    learner.wait_for("three followers waiting", |s| s.waiting == 3);

    // Version 1: the first group (epoch 1) of three; version 2: the same group.
    for version in [1u64, 2] {
        let source = &models[version as usize];
        let stats = broadcast_round(&learner, &followers, source, version, version);
        assert_eq!((stats.groups, stats.members), (1, 3), "{stats:?}");
        let size = publish(source, version).bytes.len() as u64;
        assert_eq!(stats.bytes_sent, version * size, "one copy per round");
    }

    // A member leaves: after the join window the round goes on without it, in a new group.
    drop(followers.pop());
    learner.wait_for("two followers waiting", |s| s.waiting == 2);
    let stats = broadcast_round(&learner, &followers, &models[3], 3, 3);
    assert_eq!((stats.groups, stats.members), (2, 2), "{stats:?}");

    // A member arrives: a new group of three.
    followers.push(learner.follower(&runtime, "d"));
    learner.wait_for("three followers waiting", |s| s.waiting == 3);
    let stats = broadcast_round(&learner, &followers, &models[4], 4, 4);
    assert_eq!((stats.groups, stats.members), (3, 3), "{stats:?}");
    for follower in &followers {
        assert!(follower.is_following());
    }
    // The newcomer held nothing before version 4, the others every version since they came.
    let rounds: Vec<(u64, u64)> = followers.iter().map(Follower::rounds).collect();
    assert_eq!(rounds, vec![(4, 0), (4, 0), (1, 0)]);
}

#[test]
fn a_member_that_never_joins_fails_the_round_and_the_next_recovers() {
    let _rng = torch_rng();
    let runtime = runtime();
    let models: Vec<CausalLm> = (10..13).map(tiny_model).collect();
    let config = WeightBroadcastConfig {
        enabled: true,
        join_window_ms: 300,
        join_timeout_seconds: 2,
        timeout_seconds: 2,
        ..WeightBroadcastConfig::default()
    };
    let learner = Learner::start(&runtime, publish(&models[0], 0), Some(config));
    let followers: Vec<Follower> = ["a", "b"]
        .iter()
        .map(|name| learner.follower(&runtime, name))
        .collect();
    // A member that asks for a round and then never joins the group.
    let ghost = {
        let channel = {
            let _guard = runtime.enter();
            lazy_channel("learner", &learner.url, Duration::from_secs(5), Some(TOKEN)).unwrap()
        };
        let mut client = learner_client(channel);
        runtime.spawn(async move {
            let message = pb::JoinBroadcastRequest {
                member_id: "ghost".into(),
                held_version: 0,
                device: "cpu".into(),
            };
            client
                .join_weight_broadcast(request(message, Duration::from_secs(60)))
                .await
                .map(|r| r.into_inner())
        })
    };
    learner.wait_for("two followers and the ghost waiting", |s| s.waiting == 3);

    let started = Instant::now();
    learner.shared.publish(publish(&models[1], 1));
    let stats = learner.wait_for("the failed round", |s| s.failed_rounds == 1);
    let stop = AtomicBool::new(false);
    for follower in &followers {
        // The round fails for the members too; the batch would fetch over gRPC instead.
        assert!(follower
            .take(1, Duration::from_secs(10), Duration::from_secs(30), &stop)
            .is_none());
    }
    assert_eq!(stats.rounds, 0);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the failure took {:?}",
        started.elapsed()
    );
    let ghost_round = runtime.block_on(ghost).unwrap().unwrap();
    assert_eq!((ghost_round.policy_version, ghost_round.world_size), (1, 4));
    for follower in &followers {
        assert_eq!(follower.rounds(), (0, 1));
    }

    // The followers ask again; the next version goes to them in a new group.
    learner.wait_for("the followers back", |s| s.waiting == 2);
    let stats = broadcast_round(&learner, &followers, &models[2], 2, 1);
    assert_eq!((stats.groups, stats.members), (2, 2), "{stats:?}");
}

#[test]
fn without_a_broadcast_followers_stop_and_batches_fetch_over_grpc() {
    let _rng = torch_rng();
    let runtime = runtime();
    let learner = Learner::start(&runtime, publish(&tiny_model(20), 0), None);
    let follower = learner.follower(&runtime, "a");
    wait_until("the follower to stop", || {
        (!follower.is_following()).then_some(())
    });
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    assert!(follower
        .take(1, Duration::from_secs(10), Duration::from_secs(30), &stop)
        .is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
}
