//! Following a learner: a PRM server pointed at a learner (here a stand-in that speaks the
//! Learner protocol: Status and chunked FetchPrmWeights) loads the PRM weights of each new
//! version, reports it in Status, and scores with them (equal to the new PRM in process).
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prime_model::weights::encode_var_store;
use prime_model::{CausalLm, Qwen2Config};
use prime_prm_server::service::{start, FollowConfig, ListenOptions, ServerConfig};
use prime_prm_server::{Pair, Scorer};
use prime_proto::client::{lazy_channel, prm_client, request};
use prime_proto::v1 as pb;
use prime_proto::v1::learner_server::{Learner, LearnerServer};
use prime_tests::init_threads;
use tch::{Device, Kind};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

fn qwen2() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 2
    }))
    .unwrap()
}

fn model(seed: i64) -> CausalLm {
    tch::manual_seed(seed);
    CausalLm::random(&qwen2(), Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

/// A learner as far as a PRM server sees it: a version and the PRM weights of that version.
#[derive(Default)]
struct State {
    version: AtomicU64,
    prm: Mutex<Option<prime_model::EncodedWeights>>,
    fetches: AtomicU64,
}

#[derive(Clone, Default)]
struct StandIn(Arc<State>);

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::WeightTransfer, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for StandIn {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn pull_work(
        &self,
        _: Request<pb::PullWorkRequest>,
    ) -> Result<Response<pb::WorkBatch>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn submit_groups(
        &self,
        _: Request<Streaming<pb::RolloutGroup>>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    type FetchWeightsStream = Chunks;
    async fn fetch_weights(
        &self,
        _: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    type FetchPrmWeightsStream = Chunks;
    async fn fetch_prm_weights(
        &self,
        request: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Chunks>, Status> {
        self.0.fetches.fetch_add(1, Ordering::Relaxed);
        let guard = self.0.prm.lock().unwrap();
        let encoded = guard
            .as_ref()
            .ok_or_else(|| Status::unavailable("no PRM weights yet"))?;
        let wanted = request.into_inner().policy_version;
        if wanted != encoded.manifest.policy_version {
            return Err(Status::failed_precondition("other version"));
        }
        let mut messages = vec![Ok(pb::WeightTransfer {
            payload: Some(pb::weight_transfer::Payload::Manifest(
                prime_model::transfer::manifest_to_proto(&encoded.manifest),
            )),
        })];
        // Small chunks: the server must assemble many.
        messages.extend(encoded.chunks(4096).map(|c| {
            Ok(pb::WeightTransfer {
                payload: Some(pb::weight_transfer::Payload::Chunk(pb::WeightChunk {
                    policy_version: c.policy_version,
                    offset: c.offset,
                    data: c.data.to_vec().into(),
                })),
            })
        }));
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
    async fn join_weight_broadcast(
        &self,
        _: Request<pb::JoinBroadcastRequest>,
    ) -> Result<Response<pb::BroadcastRound>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn status(
        &self,
        _: Request<pb::LearnerStatusRequest>,
    ) -> Result<Response<pb::LearnerStatus>, Status> {
        Ok(Response::new(pb::LearnerStatus {
            policy_version: self.0.version.load(Ordering::Relaxed),
            ..Default::default()
        }))
    }
}

#[test]
fn a_following_server_loads_each_new_prm_version() {
    init_threads();
    let dir = tempfile::tempdir().unwrap();
    let (prm_dir, ref_dir) = (dir.path().join("prm"), dir.path().join("ref"));
    model(1)
        .save(&prm_dir, None, prime_model::DEFAULT_MAX_SHARD_BYTES)
        .unwrap();
    model(2)
        .save(&ref_dir, None, prime_model::DEFAULT_MAX_SHARD_BYTES)
        .unwrap();
    // The server needs a tokenizer only for text step splits; these requests bring step ends.
    let tokenizer = dir.path().join("tokenizer");
    prime_tests::qwen2_ref(&["make-tokenizer", "--out", prime_tests::path_str(&tokenizer)]);

    let learner = StandIn::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let learner_addr = listener.local_addr().unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(LearnerServer::new(learner.clone()))
            .serve_with_incoming(prime_proto::transport::incoming(listener)),
    );

    let server = start(
        &ServerConfig {
            prm: prm_dir.clone(),
            reference: ref_dir.clone(),
            tokenizer: Some(tokenizer),
            beta: 0.5,
            device: Device::Cpu,
            kind: Kind::Float,
            step_split: "tokens".parse().unwrap(),
            max_batch_tokens: 1024,
            max_batch_responses: 16,
            follow: Some(FollowConfig {
                url: format!("http://{learner_addr}"),
                poll: Duration::from_millis(100),
                transfer_timeout: Duration::from_secs(10),
                tls: Default::default(),
            }),
        },
        &ListenOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            auth: Default::default(),
        },
        false,
    )
    .unwrap();
    let client = {
        let _inside = runtime.enter();
        prm_client(
            lazy_channel(
                "prm-server",
                &format!("http://{}", server.addr),
                Duration::from_secs(5),
                None,
            )
            .unwrap(),
        )
    };
    let pair = Pair {
        prompt_ids: vec![5, 9, 11, 40],
        response_ids: vec![7, 8, 30, 31, 2],
    };
    let score = || {
        runtime
            .block_on(client.clone().process_rewards(request(
                pb::ProcessRewardsRequest {
                    pairs: vec![pb::RewardPair {
                        id: "x".into(),
                        prompt_ids: pair.prompt_ids.clone(),
                        response_ids: pair.response_ids.clone(),
                        step_ends: vec![5],
                    }],
                    step_split: String::new(),
                },
                Duration::from_secs(10),
            )))
            .unwrap()
            .into_inner()
            .results
            .remove(0)
            .token_rewards
    };
    let status = || {
        runtime
            .block_on(
                client
                    .clone()
                    .status(request(pb::PrmStatusRequest {}, Duration::from_secs(5))),
            )
            .unwrap()
            .into_inner()
    };
    let in_process = |prm: CausalLm| {
        let reference = CausalLm::load(&ref_dir, Device::Cpu, Kind::Float, Kind::Float).unwrap();
        Scorer::new(prm, reference, 0.5, 1024)
            .unwrap()
            .token_rewards(std::slice::from_ref(&pair))
            .unwrap()
            .remove(0)
    };
    let before = score();
    let loaded = CausalLm::load(&prm_dir, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    assert!(prime_tests::max_abs_diff(&before, &in_process(loaded)) < 1e-6);
    assert_eq!(status().prm_version, 0);
    assert_eq!(status().learner_url, format!("http://{learner_addr}"));

    // The learner moves to version 3 with a new PRM.
    let new_prm = model(3);
    *learner.0.prm.lock().unwrap() = Some(encode_var_store(&new_prm.vs, 3, None).unwrap());
    learner.0.version.store(3, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status().prm_version != 3 {
        assert!(
            Instant::now() < deadline,
            "the server never loaded version 3"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = score();
    assert!(prime_tests::max_abs_diff(&after, &in_process(new_prm)) < 1e-6);
    assert!(prime_tests::max_abs_diff(&after, &before) > 1e-3);
    // Nothing new: no more transfers.
    let fetches = learner.0.fetches.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(learner.0.fetches.load(Ordering::Relaxed), fetches);
    server.shutdown().unwrap();
}
