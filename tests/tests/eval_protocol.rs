//! `prime eval` on the embedded default world (configs/demo.toml's `[world]`): the same seed
//! gives the same samples and figures, another seed other samples; the figures equal a recount
//! from the samples re-graded by the verifier; greedy samples equal a greedy decode of each
//! prompt alone; Best-of-N scores from a PRM server equal those of the same PRM in process.
use std::path::{Path, PathBuf};

use prime_learner::eval::protocol::{
    evaluate, evaluate_loaded, BonConfig, EvalConfig, PrmScoring, OVERALL,
};
use prime_learner::RunConfig;
use prime_model::{CausalLm, SamplingParams, Tokenizer};
use prime_prm_server::service::{start, ListenOptions, ServerConfig};
use prime_prm_server::{Aggregation, Scorer};
use prime_tests::{init_threads, repo_root, write_tiny_start_model};
use tch::{Device, Kind};

/// The demo's world and a random tiny policy with its tokenizer; a second random model (the
/// "PRM") next to it.
/// Sampling draws from torch's process-wide generator: the tests of this file take turns.
fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

fn setup(dir: &Path) -> (RunConfig, PathBuf, PathBuf, Vec<prime_world::DataRow>) {
    let config = RunConfig::from_file(&repo_root().join("configs/demo.toml")).unwrap();
    write_tiny_start_model(dir, &config, 7);
    let policy = prime_learner::checkpoint::sft_checkpoint(dir);
    let lm = load(&policy);
    tch::manual_seed(8);
    let mut prm = CausalLm::random(&lm.config, Device::Cpu, Kind::Float, Kind::Float).unwrap();
    prm.generation_config = lm.generation_config.clone();
    let prm_dir = dir.join("prm");
    prm.save(&prm_dir, None, prime_model::DEFAULT_MAX_SHARD_BYTES)
        .unwrap();
    prime_model::checkpoint::copy_tokenizer_files(&policy, &prm_dir).unwrap();
    let rows = prime_world::read_rows(&dir.join("world/data/heldout.parquet")).unwrap();
    (config, policy, prm_dir, rows)
}

fn load(dir: &Path) -> CausalLm {
    CausalLm::load(dir, Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

fn eval_config(seed: u64) -> EvalConfig {
    EvalConfig {
        k: 3,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 20,
        greedy: true,
        limit: Some(10),
        seed,
        batch_rows: 8,
    }
}

#[test]
fn eval_is_reproducible_and_recounts_on_the_default_world() {
    let _rng = torch_rng();
    init_threads();
    let dir = tempfile::tempdir().unwrap();
    let (_, policy, _, rows) = setup(dir.path());
    let run = |seed| {
        evaluate(
            &policy,
            "heldout",
            &rows,
            &eval_config(seed),
            None,
            Device::Cpu,
            Kind::Float,
        )
        .unwrap()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    assert_eq!(a.samples, b.samples);
    let strip = |mut r: prime_learner::eval::protocol::EvalReport| {
        r.seconds = 0.0;
        r
    };
    assert_eq!(strip(a.report.clone()), strip(b.report.clone()));
    let texts = |e: &prime_learner::eval::protocol::Evaluation| -> Vec<Vec<i64>> {
        e.samples
            .iter()
            .filter(|s| s.sample.is_some())
            .map(|s| s.token_ids.clone())
            .collect()
    };
    assert_ne!(texts(&a), texts(&c), "another seed samples differently");
    // Greedy decodes do not depend on the seed.
    let greedy = |e: &prime_learner::eval::protocol::Evaluation| -> Vec<Vec<i64>> {
        e.samples
            .iter()
            .filter(|s| s.sample.is_none())
            .map(|s| s.token_ids.clone())
            .collect()
    };
    assert_eq!(greedy(&a), greedy(&c));

    // 10 problems, 3 samples and one greedy decode each, at most 20 new tokens.
    assert_eq!(a.samples.len(), 40);
    assert_eq!(a.report.max_new_tokens_used, 20);
    assert!(a
        .samples
        .iter()
        .all(|s| !s.token_ids.is_empty() && s.token_ids.len() <= 20));

    // Re-grade every sample and recount the overall figures.
    let lm = load(&policy);
    let tokenizer = Tokenizer::from_dir(&policy).unwrap();
    for s in &a.samples {
        let text = tokenizer.decode(&s.token_ids, true).unwrap();
        assert_eq!(text, s.text);
        let verdict =
            prime_verifier::math::grade_math(&text, &rows[s.problem].reward_model.ground_truth);
        assert_eq!(verdict.score(), s.score);
        assert_eq!(verdict.extracted, s.answer);
    }
    let overall = a
        .report
        .accuracy
        .iter()
        .find(|r| r.data_source == OVERALL)
        .unwrap();
    let sampled: Vec<f64> = a
        .samples
        .iter()
        .filter(|s| s.sample.is_some())
        .map(|s| s.score)
        .collect();
    assert_eq!(overall.problems, 10);
    assert!((overall.avg_at_k - sampled.iter().sum::<f64>() / 30.0).abs() < 1e-12);
    let greedy_scores: Vec<f64> = a
        .samples
        .iter()
        .filter(|s| s.sample.is_none())
        .map(|s| s.score)
        .collect();
    assert!((overall.greedy.unwrap() - greedy_scores.iter().sum::<f64>() / 10.0).abs() < 1e-12);
    assert_eq!(a.report.accuracy.len(), 2, "one data source plus overall");
    assert_eq!(a.report.accuracy[0].data_source, rows[0].data_source);

    // Each greedy sample equals the greedy decode of its prompt alone.
    let chat = |row: &prime_world::DataRow| {
        let messages: Vec<prime_model::ChatMessage> = row
            .prompt
            .iter()
            .map(|m| prime_model::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        tokenizer.encode_chat(&messages, true).unwrap()
    };
    let params = SamplingParams {
        max_new_tokens: 20,
        temperature: 0.0,
        stop_token_ids: lm.eos_token_ids(),
        ..SamplingParams::default()
    };
    for (p, ids) in greedy(&a).iter().enumerate().take(3) {
        let alone = prime_model::generate(&lm.model, &[chat(&rows[p])], &params).unwrap();
        assert_eq!(&alone[0].token_ids, ids, "problem {p}");
    }

    // The output dir: report, samples and the plot.
    let out = dir.path().join("eval");
    let written = a.write(&out).unwrap();
    assert!(out.join("report.json").exists() && out.join("samples.jsonl").exists());
    let back: prime_learner::eval::protocol::EvalReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(back, a.report);
    assert!(a.report.table().contains("overall"));
    assert!(written.len() >= 2);
}

#[test]
fn best_of_n_through_a_server_equals_the_prm_in_process() {
    let _rng = torch_rng();
    init_threads();
    let dir = tempfile::tempdir().unwrap();
    let (_, policy, prm_dir, rows) = setup(dir.path());
    let server = start(
        &ServerConfig {
            prm: prm_dir.clone(),
            reference: policy.clone(),
            tokenizer: None,
            beta: 0.5,
            device: Device::Cpu,
            kind: Kind::Float,
            step_split: "lines".parse().unwrap(),
            max_batch_tokens: 4096,
            max_batch_responses: 64,
            follow: None,
        },
        &ListenOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            auth: Default::default(),
        },
        false,
    )
    .unwrap();
    let bon = BonConfig {
        n: 4,
        prm_url: format!("http://{}", server.addr),
        token: None,
        aggregation: Aggregation::Min,
        step_split: String::new(),
        timeout_secs: 60.0,
    };
    let config = EvalConfig {
        limit: Some(6),
        greedy: false,
        ..eval_config(3)
    };
    let remote = evaluate(
        &policy,
        "heldout",
        &rows,
        &config,
        Some(&bon),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let lm = load(&policy);
    let tokenizer = Tokenizer::from_dir(&policy).unwrap();
    let scorer = Scorer::new(load(&prm_dir), load(&policy), 0.5, 4096).unwrap();
    let local = evaluate_loaded(
        &lm,
        &tokenizer,
        "policy",
        "heldout",
        &rows,
        &config,
        PrmScoring::Local {
            bon: &bon,
            scorer: &scorer,
            tokenizer: &tokenizer,
        },
    )
    .unwrap();
    // k is raised to N; the same samples, the same PRM scores.
    assert_eq!(remote.report.config.k, 4);
    assert_eq!(remote.samples.len(), 24);
    for (r, l) in remote.samples.iter().zip(&local.samples) {
        assert_eq!(r.token_ids, l.token_ids);
        let (a, b) = (r.prm_score.unwrap(), l.prm_score.unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // The curve: n = 1, 2, 4; Best-of-N at n is the score of the best-scored of the first n.
    let ns: Vec<usize> = remote.report.curve.iter().map(|p| p.n).collect();
    assert_eq!(ns, [1, 2, 4]);
    for point in &remote.report.curve {
        let mut total = 0.0;
        for p in 0..6 {
            let first: Vec<_> = remote
                .samples
                .iter()
                .filter(|s| s.problem == p && s.sample.unwrap() < point.n)
                .collect();
            let best = first
                .iter()
                .enumerate()
                .max_by(|a, b| {
                    a.1.prm_score
                        .unwrap()
                        .total_cmp(&b.1.prm_score.unwrap())
                        .then(b.0.cmp(&a.0))
                })
                .unwrap();
            total += best.1.score;
        }
        assert!((point.best_of_n.unwrap() - total / 6.0).abs() < 1e-12);
        assert!(
            point.pass_at_n >= point.best_of_n.unwrap() && point.pass_at_n >= point.random_pick
        );
    }
    server.shutdown().unwrap();
}
