//! The PRM server on a loopback port against independent references: its token rewards equal
//! the learner's (the same step's PRM figures) and transformers' log-ratios; Best-of-N ranks
//! as those rewards say and picks the candidate the PRM prefers; text step splits follow the
//! tokenizer; health, token check, status and Prometheus answer.
use std::path::{Path, PathBuf};
use std::time::Duration;

use prime_algo::ReferenceType;
use prime_learner::{prime_step, LearnerConfig, PrimeModels, ScoredGroup, ScoredResponse};
use prime_model::{CausalLm, Tokenizer};
use prime_prm_server::service::{start, ListenOptions, RunningServer, ServerConfig};
use prime_proto::auth::ServerAuth;
use prime_proto::client::{lazy_channel, prm_client, request, PrmClient};
use prime_proto::v1 as pb;
use prime_tests::{
    init_threads, path_str, qwen2_ref, random_sequences, reference_greedy, reference_logprobs,
};
use tch::{Device, Kind};

const BETA: f64 = 0.5;

/// A tokenizer, a PRM and a reference made by transformers (independent of our model code).
struct Models {
    _dir: tempfile::TempDir,
    tokenizer: PathBuf,
    prm: PathBuf,
    reference: PathBuf,
    vocab: i64,
    eos: i64,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = dir.path().join("tokenizer");
    let made = qwen2_ref(&[
        "make-tokenizer",
        "--out",
        path_str(&tokenizer),
        "--vocab-size",
        "300",
    ]);
    let vocab = made["vocab_size"].as_i64().unwrap();
    let eos = made["special_ids"]["<|im_end|>"].as_i64().unwrap();
    let make = |name: &str, seed: &str| {
        let out = dir.path().join(name);
        let (vocab, eos) = (vocab.to_string(), eos.to_string());
        qwen2_ref(&[
            "make",
            "--out",
            path_str(&out),
            "--vocab",
            &vocab,
            "--eos-id",
            &eos,
            "--seed",
            seed,
            "--hidden",
            "32",
            "--intermediate",
            "64",
            "--max-pos",
            "128",
        ]);
        out
    };
    Models {
        prm: make("prm", "1"),
        reference: make("ref", "2"),
        tokenizer,
        vocab,
        eos,
        _dir: dir,
    }
}

fn server(m: &Models, token: Option<&str>, split: &str) -> RunningServer {
    let config = ServerConfig {
        prm: m.prm.clone(),
        reference: m.reference.clone(),
        tokenizer: Some(m.tokenizer.clone()),
        beta: BETA,
        device: Device::Cpu,
        kind: Kind::Float,
        step_split: split.parse().unwrap(),
        max_batch_tokens: 200,
        max_batch_responses: 64,
        follow: None,
    };
    let listen = ListenOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: ServerAuth {
            token: token.map(str::to_string),
            ..ServerAuth::default()
        },
    };
    start(&config, &listen, false).expect("server starts")
}

fn client(rt: &tokio::runtime::Runtime, server: &RunningServer, token: Option<&str>) -> PrmClient {
    let _inside = rt.enter();
    let url = format!("http://{}", server.addr);
    prm_client(lazy_channel("prm-server", &url, Duration::from_secs(10), token).unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Groups of 3 responses with ids in the vocabulary; one response has an EOS in its middle
/// (the tokens after it are not trained on, so they get no reward).
fn groups(m: &Models) -> Vec<ScoredGroup> {
    let v = m.vocab - 3;
    let prompts = random_sequences(3, 3, 9, v, 21);
    let mut responses = random_sequences(9, 2, 14, v, 22);
    responses[4] = vec![5, 9, m.eos, 17, 23, 29];
    responses[7].push(m.eos);
    let scores = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 1.0];
    prompts
        .iter()
        .enumerate()
        .map(|(g, p)| ScoredGroup {
            prompt_ids: p.clone(),
            responses: (0..3)
                .map(|i| ScoredResponse {
                    ids: responses[g * 3 + i].clone(),
                    score: scores[g * 3 + i],
                    sampling_logprobs: Vec::new(),
                    truncated: false,
                })
                .collect(),
        })
        .collect()
}

fn pairs(groups: &[ScoredGroup]) -> Vec<pb::RewardPair> {
    groups
        .iter()
        .flat_map(|g| {
            g.responses.iter().enumerate().map(|(i, r)| pb::RewardPair {
                id: format!("r{i}"),
                prompt_ids: g.prompt_ids.clone(),
                response_ids: r.ids.clone(),
                step_ends: Vec::new(),
            })
        })
        .collect()
}

/// transformers' rewards: β(log π_prm − log π_ref) per response token, 0 after the first EOS.
fn expected_rewards(m: &Models, pairs: &[(Vec<i64>, Vec<i64>)]) -> Vec<Vec<f32>> {
    let sequences: Vec<Vec<i64>> = pairs
        .iter()
        .map(|(p, r)| p.iter().chain(r).copied().collect())
        .collect();
    let prm = reference_logprobs(&m.prm, &sequences, "float32");
    let reference = reference_logprobs(&m.reference, &sequences, "float32");
    pairs
        .iter()
        .enumerate()
        .map(|(i, (p, r))| {
            let first_eos = r.iter().position(|&t| t == m.eos).unwrap_or(r.len());
            (0..r.len())
                .map(|t| {
                    let at = p.len() - 1 + t;
                    if t <= first_eos {
                        (BETA * f64::from(prm[i][at] - reference[i][at])) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

fn load(dir: &Path) -> CausalLm {
    CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

#[test]
fn token_rewards_equal_the_learners_and_transformers() {
    init_threads();
    let m = models();
    let server = server(&m, None, "tokens");
    let groups = groups(&m);
    let rt = runtime();
    let reply = rt
        .block_on(client(&rt, &server, None).process_rewards(request(
            pb::ProcessRewardsRequest {
                pairs: pairs(&groups),
                step_split: String::new(),
            },
            Duration::from_secs(60),
        )))
        .unwrap()
        .into_inner();
    let results = reply.results;
    assert_eq!(results.len(), 9);
    assert_eq!(results[4].id, "r1");

    // transformers, token by token.
    let flat: Vec<(Vec<i64>, Vec<i64>)> = groups
        .iter()
        .flat_map(|g| {
            g.responses
                .iter()
                .map(|r| (g.prompt_ids.clone(), r.ids.clone()))
        })
        .collect();
    let expected = expected_rewards(&m, &flat);
    for (got, want) in results.iter().zip(&expected) {
        assert_eq!(got.token_rewards.len(), want.len());
        let diff = prime_tests::max_abs_diff(&got.token_rewards, want);
        assert!(
            diff < 1e-4,
            "token rewards off by {diff}: {:?} vs {want:?}",
            got.token_rewards
        );
        // "tokens": every token is a step.
        assert_eq!(got.step_scores, got.token_rewards);
        assert_eq!(got.step_ends, (1..=want.len() as u32).collect::<Vec<_>>());
    }
    assert_eq!(&results[4].token_rewards[3..], &[0.0, 0.0, 0.0]);
    assert!(
        results[4].token_rewards[2] != 0.0,
        "the EOS itself is rewarded"
    );

    // The learner's step on the same weights and groups: its PRM figures come from the same
    // rewards, before any update.
    let mut config = {
        let mut c = LearnerConfig::default();
        c.algo.mini_batches = 1;
        c.algo.reference = ReferenceType::Freeze;
        c
    };
    config.algo.prm.beta = BETA;
    let mut learner = PrimeModels::new(
        load(&m.reference),
        load(&m.prm),
        Some(load(&m.reference)),
        &config,
    );
    let metrics = prime_step(
        &mut learner,
        &mut prime_learner::parallel::DataParallel::single(tch::Device::Cpu),
        &groups,
        &config,
        0,
    )
    .unwrap();
    let sums: Vec<f64> = results
        .iter()
        .map(|r| r.token_rewards.iter().map(|&x| f64::from(x)).sum())
        .collect();
    let n = sums.len() as f64;
    let mean = sums.iter().sum::<f64>() / n;
    let std = (sums.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        (mean - metrics.prm_reward_mean).abs() < 1e-5,
        "{mean} vs {}",
        metrics.prm_reward_mean
    );
    assert!(
        (std - metrics.prm_reward_std).abs() < 1e-5,
        "{std} vs {}",
        metrics.prm_reward_std
    );
    let scores: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.responses.iter().map(|r| r.score))
        .collect();
    let loss = sums
        .iter()
        .zip(&scores)
        .map(|(&x, &y)| {
            let sigma = 1.0 / (1.0 + (-x).exp());
            -(y * sigma.ln() + (1.0 - y) * (1.0 - sigma).ln())
        })
        .sum::<f64>()
        / n;
    assert!(
        (loss - metrics.prm_new_batch_loss).abs() < 1e-5,
        "{loss} vs {}",
        metrics.prm_new_batch_loss
    );

    // Status counts what was scored.
    let status = rt
        .block_on(
            client(&rt, &server, None)
                .status(request(pb::PrmStatusRequest {}, Duration::from_secs(5))),
        )
        .unwrap()
        .into_inner();
    assert_eq!(status.responses_scored, 9);
    let tokens: usize = flat.iter().map(|(_, r)| r.len()).sum();
    assert_eq!(status.tokens_scored, tokens as u64);
    assert_eq!(status.beta, BETA);
    assert!(status.batches >= 1 && status.batch_size_max == 9);
    assert_eq!(status.step_split, "tokens");
    server.shutdown().unwrap();
}

#[test]
fn best_of_n_picks_what_the_prm_prefers() {
    init_threads();
    let m = models();
    let server = server(&m, None, "tokens");
    let prompt: Vec<i64> = vec![11, 42, 77, 5, 120];
    // The PRM's own greedy continuation is likely under π_prm and unlikely under π_ref; the
    // reference's greedy continuation the other way round.
    let from_prm = reference_greedy(&m.prm, std::slice::from_ref(&prompt), 10).remove(0);
    let from_ref = reference_greedy(&m.reference, std::slice::from_ref(&prompt), 10).remove(0);
    let random = random_sequences(3, 4, 10, m.vocab - 3, 31);
    let mut candidates = vec![from_ref.clone()];
    candidates.extend(random.iter().cloned());
    candidates.insert(2, from_prm.clone());
    let step_ends = |r: &Vec<i64>| vec![(r.len() / 2).max(1) as u32, r.len() as u32];
    let rt = runtime();
    let ask = |aggregation: pb::Aggregation, voting: pb::Voting, answers: &[&str]| {
        rt.block_on(
            client(&rt, &server, None).best_of_n(request(
                pb::BestOfNRequest {
                    prompt_ids: prompt.clone(),
                    candidates: candidates
                        .iter()
                        .enumerate()
                        .map(|(i, r)| pb::Candidate {
                            response_ids: r.clone(),
                            step_ends: if r.len() > 1 {
                                step_ends(r)
                            } else {
                                Vec::new()
                            },
                            answer: answers.get(i).map_or(String::new(), |a| a.to_string()),
                        })
                        .collect(),
                    aggregation: aggregation as i32,
                    voting: voting as i32,
                    step_split: String::new(),
                },
                Duration::from_secs(60),
            )),
        )
        .unwrap()
        .into_inner()
    };
    let reply = ask(pb::Aggregation::Sum, pb::Voting::None, &[]);
    assert_eq!(
        reply.ranking[0], 2,
        "the PRM's own continuation ranks first: {:?}",
        reply.scores
    );
    assert_eq!(
        *reply.ranking.last().unwrap(),
        0,
        "the reference's ranks last: {:?}",
        reply.scores
    );

    // The ranking is the order of the scores transformers' log-probs give, for each
    // aggregation of the two steps.
    let pairs: Vec<(Vec<i64>, Vec<i64>)> = candidates
        .iter()
        .map(|r| (prompt.clone(), r.clone()))
        .collect();
    let expected = expected_rewards(&m, &pairs);
    for (aggregation, f) in [
        (
            pb::Aggregation::Min,
            (|a: f32, b: f32| a.min(b)) as fn(f32, f32) -> f32,
        ),
        (pb::Aggregation::Sum, |a, b| a + b),
        (pb::Aggregation::Mean, |a, b| (a + b) / 2.0),
        (pb::Aggregation::Last, |_, b| b),
    ] {
        let reply = ask(aggregation, pb::Voting::None, &[]);
        let want: Vec<f32> = candidates
            .iter()
            .zip(&expected)
            .map(|(r, rewards)| {
                let cut = step_ends(r)[0] as usize;
                f(rewards[..cut].iter().sum(), rewards[cut..].iter().sum())
            })
            .collect();
        assert!(
            prime_tests::max_abs_diff(&reply.scores, &want) < 1e-4,
            "{aggregation:?}: {:?} vs {want:?}",
            reply.scores
        );
        let mut order: Vec<u32> = (0..want.len() as u32).collect();
        order.sort_by(|&a, &b| {
            want[b as usize]
                .total_cmp(&want[a as usize])
                .then(a.cmp(&b))
        });
        assert_eq!(reply.ranking, order, "{aggregation:?}");
    }

    // Majority vote over given answers: "7" twice beats the PRM's favourite "9"; within "7"
    // the better-scored candidate leads; candidates without an answer come last.
    let answers = ["7", "8", "9", "7", ""];
    let reply = ask(pb::Aggregation::Sum, pb::Voting::Majority, &answers);
    let s = &reply.scores;
    let sevens = if s[0] >= s[3] { [0, 3] } else { [3, 0] };
    assert_eq!(&reply.ranking[..2], &sevens);
    // Given answers are kept; the candidate given none has one extracted from its text (the
    // math grader's extraction, which finds a final value in most text), and comes last
    // when none is found.
    assert_eq!(reply.answers[..4], answers[..4]);
    if reply.answers[4].is_empty() {
        assert_eq!(reply.ranking[4], 4);
    }
    // One vote each: the tie goes to the best PRM score, the PRM's own continuation.
    let reply = ask(
        pb::Aggregation::Sum,
        pb::Voting::Majority,
        &["1", "2", "3", "4", "5"],
    );
    assert_eq!(reply.ranking[0], 2);
    server.shutdown().unwrap();
}

#[test]
fn text_steps_health_token_and_metrics() {
    init_threads();
    let m = models();
    let server = server(&m, Some("s3cret-s3cret-s3cret"), "lines");
    let tokenizer = Tokenizer::from_dir(&m.tokenizer).unwrap();
    let text = "Tom has 2+3=5 apples.\nThen 5*2=10.\n\n\\boxed{10}";
    let mut response = tokenizer.encode(text).unwrap();
    response.push(m.eos);
    let prompt = tokenizer.encode("How many apples?").unwrap();
    let rt = runtime();

    // Without the token: refused.
    let refused = rt.block_on(
        client(&rt, &server, None).status(request(pb::PrmStatusRequest {}, Duration::from_secs(5))),
    );
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);

    let mut authed = client(&rt, &server, Some("s3cret-s3cret-s3cret"));
    let ask = |split: &str| {
        let mut c = authed.clone();
        rt.block_on(c.process_rewards(request(
            pb::ProcessRewardsRequest {
                pairs: vec![pb::RewardPair {
                    id: "a".into(),
                    prompt_ids: prompt.clone(),
                    response_ids: response.clone(),
                    step_ends: Vec::new(),
                }],
                step_split: split.into(),
            },
            Duration::from_secs(30),
        )))
        .unwrap()
        .into_inner()
        .results
        .remove(0)
    };
    // Each line is a step (its newline included); the EOS stays with the last one.
    let lines = ask("");
    let pieces: Vec<String> = std::iter::once(0)
        .chain(lines.step_ends.iter().copied())
        .collect::<Vec<u32>>()
        .windows(2)
        .map(|w| {
            tokenizer
                .decode(&response[w[0] as usize..w[1] as usize], true)
                .unwrap()
        })
        .collect();
    assert_eq!(
        pieces,
        vec!["Tom has 2+3=5 apples.\n", "Then 5*2=10.\n\n", "\\boxed{10}"]
    );
    let sums: Vec<f32> = std::iter::once(0)
        .chain(lines.step_ends.iter().copied())
        .collect::<Vec<u32>>()
        .windows(2)
        .map(|w| {
            lines.token_rewards[w[0] as usize..w[1] as usize]
                .iter()
                .sum()
        })
        .collect();
    assert!(prime_tests::max_abs_diff(&sums, &lines.step_scores) < 1e-6);
    // A header split: "Then" starts the second step.
    let custom = ask("before:Then");
    assert_eq!(custom.step_ends.len(), 2);
    let first = tokenizer
        .decode(&response[..custom.step_ends[0] as usize], true)
        .unwrap();
    assert_eq!(first, "Tom has 2+3=5 apples.\n");
    assert_eq!(custom.token_rewards, lines.token_rewards);

    // Bad requests get INVALID_ARGUMENT, not a crash.
    let bad = rt.block_on(authed.process_rewards(request(
        pb::ProcessRewardsRequest {
            pairs: vec![pb::RewardPair {
                id: "b".into(),
                prompt_ids: vec![1],
                response_ids: vec![m.vocab + 5],
                step_ends: Vec::new(),
            }],
            step_split: String::new(),
        },
        Duration::from_secs(5),
    )));
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
    let bad_split = rt.block_on(authed.process_rewards(request(
        pb::ProcessRewardsRequest {
            pairs: vec![pb::RewardPair {
                id: "c".into(),
                prompt_ids: vec![1],
                response_ids: vec![2, 3],
                step_ends: vec![1, 1],
            }],
            step_split: String::new(),
        },
        Duration::from_secs(5),
    )));
    assert_eq!(bad_split.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Health (no token needed) and Prometheus.
    let _inside = rt.enter();
    let channel = lazy_channel(
        "prm-server",
        &format!("http://{}", server.addr),
        Duration::from_secs(5),
        None,
    )
    .unwrap();
    let health = rt
        .block_on(
            tonic_health::pb::health_client::HealthClient::new(channel).check(
                tonic_health::pb::HealthCheckRequest {
                    service: "prime.v1.PrmServer".into(),
                },
            ),
        )
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let metrics = {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(server.metrics_addr.unwrap()).unwrap();
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        socket.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        metrics.contains("prime_prm_responses_scored_total 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("prime_prm_errors_total 2\n"), "{metrics}");
    server.shutdown().unwrap();
}
