//! The Prometheus metrics of every role, scraped from real `prime` processes on loopback and
//! parsed by the official Python client's parsers (tests/python/prom_parse.py): a verifier, a
//! PRM server, a learner and an actor that starts before the learner. Checks that each family
//! has the type, labels and help docs/metrics.md gives it (and that the page lists no family
//! that is not exported), that the classic text and OpenMetrics agree, that counters and
//! histograms move with the work done (response counts and token sums agree between the
//! learner, the actor and the verifier), that the actor's probes say alive at once and ready
//! only once registered with the weights, and that the learner's `work_backlog` falls to 0
//! while the actor holds the step's work and rises again once its leases run out.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prime_tests::{
    free_addr, repo_root, run_python, step_records, wait_for, write_tiny_start_model, Procs,
};
use serde_json::Value;

const CONFIG: &str = r#"
[world]
seed = 5
sft = { size = 40 }
rl = { size = 80 }
heldout = { size = 6 }

[learner]
steps = 1000

[learner.algo]
mini_batches = 2
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 3
max_response_tokens = 24
lease_seconds = 2

[learner.eval]
every = 0
problems = 6
greedy = false

[learner.checkpoint]
every = 0
"#;

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_prime"))
        .args(args)
        .env("PRIME_THREADS", "1")
        .env("RUST_LOG", "info")
        .env_remove("PRIME_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prime starts")
}

/// `GET path` on `addr`: the status code and the body; `None` while nothing answers.
fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The `/metrics` text of `addr` (Prometheus text format unless OpenMetrics is asked for).
fn scrape(addr: SocketAddr, openmetrics: bool) -> String {
    let accept = openmetrics.then_some("application/openmetrics-text; version=1.0.0");
    let (code, body) = get(addr, "/metrics", accept).expect("metrics answer");
    assert_eq!(code, 200, "{body}");
    body
}

/// One sample of a text-format scrape, by its exposed name with labels (as in the text).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn learner_sample(addr: SocketAddr, name: &str) -> f64 {
    get(addr, "/metrics", None)
        .and_then(|(_, body)| sample(&body, &format!("prime_learner_{name}")))
        .unwrap_or(-1.0)
}

/// The text and OpenMetrics scrapes of `addr` at a moment it is quiet: the text scrape before
/// and after the OpenMetrics one are equal (so none caught an update half-way).
fn stable_scrape(addr: SocketAddr) -> (String, String) {
    let mut scrapes = None;
    wait_for("two equal scrapes", Duration::from_secs(120), || {
        let before = scrape(addr, false);
        let openmetrics = scrape(addr, true);
        std::thread::sleep(Duration::from_millis(300));
        let equal = scrape(addr, false) == before;
        scrapes = Some((before, openmetrics));
        equal
    });
    scrapes.unwrap()
}

/// Families as the Python parsers see them: name -> {type, help, samples}.
type Families = BTreeMap<String, Value>;

/// Parses each text with tests/python/prom_parse.py (OpenMetrics when `.om`).
fn parse_all(dir: &Path, texts: &[(&str, &str)]) -> BTreeMap<String, Families> {
    let paths: Vec<String> = texts
        .iter()
        .map(|(file, text)| {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        })
        .collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let parsed = run_python("tests/python/prom_parse.py", &args);
    texts
        .iter()
        .zip(&paths)
        .map(|((file, _), path)| {
            let families = parsed[path.as_str()].as_object().unwrap();
            let families = families
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (file.to_string(), families)
        })
        .collect()
}

/// The value of the sample `name` with `labels` in `families`.
fn value(families: &Families, name: &str, labels: &[(&str, &str)]) -> f64 {
    families
        .values()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .find(|s| {
            s["name"] == name
                && s["labels"].as_object().unwrap().len() == labels.len()
                && labels.iter().all(|(k, v)| s["labels"][*k] == *v)
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))["value"]
        .as_f64()
        .unwrap()
}

/// The rows of docs/metrics.md's Prometheus tables: family (as exposed, `_total` included)
/// -> (type, labels, help).
fn documented() -> BTreeMap<String, (String, BTreeSet<String>, String)> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let section = text
        .split_once("\n## Prometheus")
        .expect("a Prometheus section")
        .1;
    let mut rows = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() != 6 || !cells[1].starts_with("`prime_") {
            continue;
        }
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        rows.insert(
            cells[1].trim_matches('`').to_string(),
            (cells[2].to_string(), labels, cells[4].to_string()),
        );
    }
    rows
}

/// Checks every family of `families` against the documentation, and that the
/// documentation's families of `prefix` are all there; histogram buckets are cumulative.
fn check_documented(role: &str, families: &Families, prefix: &str, optional: &[&str]) {
    let docs = documented();
    let mut seen = BTreeSet::new();
    for (name, family) in families {
        let kind = family["type"].as_str().unwrap();
        let exposed = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.clone()
        };
        let (doc_kind, doc_labels, doc_help) = docs
            .get(&exposed)
            .unwrap_or_else(|| panic!("{role}: {exposed} is not in docs/metrics.md"));
        assert_eq!(kind, doc_kind, "{role}: type of {exposed}");
        assert_eq!(
            family["help"],
            doc_help.as_str(),
            "{role}: help of {exposed}"
        );
        let samples = family["samples"].as_array().unwrap();
        assert!(!samples.is_empty(), "{role}: {exposed} has no samples");
        let labels: BTreeSet<String> = samples
            .iter()
            .flat_map(|s| s["labels"].as_object().unwrap().keys().cloned())
            .filter(|l| l != "le")
            .collect();
        assert_eq!(&labels, doc_labels, "{role}: labels of {exposed}");
        if kind == "histogram" {
            check_histogram(role, name, samples);
        }
        seen.insert(exposed);
    }
    for name in docs.keys().filter(|n| n.starts_with(prefix)) {
        assert!(
            seen.contains(name) || optional.contains(&name.as_str()),
            "{role}: docs/metrics.md lists {name}, which is not exported"
        );
    }
}

/// Buckets are cumulative and end in `+Inf` = `_count`, per label set.
fn check_histogram(role: &str, name: &str, samples: &[Value]) {
    let mut by_labels: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for s in samples {
        let mut labels = s["labels"].as_object().unwrap().clone();
        let le = labels.remove("le");
        let key = serde_json::to_string(&labels).unwrap();
        let v = s["value"].as_f64().unwrap();
        if s["name"] == format!("{name}_bucket") {
            let le = le.unwrap();
            let bound = match le.as_str().unwrap() {
                "+Inf" => f64::INFINITY,
                b => b.parse().unwrap(),
            };
            by_labels.entry(key).or_default().push((bound, v));
        } else if s["name"] == format!("{name}_count") {
            counts.insert(key, v);
        }
    }
    assert!(!by_labels.is_empty(), "{role}: {name} has no buckets");
    for (key, mut buckets) in by_labels {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{role}: {name}{key} buckets are not cumulative: {buckets:?}"
        );
        let last = buckets.last().unwrap();
        assert!(
            last.0.is_infinite(),
            "{role}: {name}{key} has no +Inf bucket"
        );
        assert_eq!(
            Some(&last.1),
            counts.get(&key),
            "{role}: {name}{key} +Inf vs count"
        );
    }
}

/// Same families with the same types in both formats.
fn check_formats_agree(role: &str, classic: &Families, openmetrics: &Families) {
    let types = |f: &Families| -> BTreeMap<String, Value> {
        f.iter()
            .map(|(k, v)| (k.clone(), v["type"].clone()))
            .collect()
    };
    assert_eq!(
        types(classic),
        types(openmetrics),
        "{role}: text vs OpenMetrics"
    );
}

#[test]
fn every_role_exports_documented_typed_metrics_that_move_with_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run_dir = dir.join("run");
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    write_tiny_start_model(&run_dir, &config, 11);
    let model = prime_learner::checkpoint::sft_checkpoint(&run_dir);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (config_arg, run_arg, model_arg) = (s(&config_path), s(&run_dir), s(&model));
    let addrs: Vec<SocketAddr> = (0..7).map(|_| free_addr()).collect();
    let [verifier, verifier_m, prm, prm_m, learner, learner_m, actor_m] = addrs[..] else {
        unreachable!()
    };
    let a = |addr: SocketAddr| addr.to_string();
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        &[
            "verifier",
            "serve",
            "--listen",
            &a(verifier),
            "--metrics-listen",
            &a(verifier_m),
        ],
        &dir.join("verifier.log"),
    ));
    procs.0.push(spawn(
        &[
            "prm-server",
            "serve",
            "--prm",
            &model_arg,
            "--ref",
            &model_arg,
            "--listen",
            &a(prm),
            "--metrics-listen",
            &a(prm_m),
        ],
        &dir.join("prm.log"),
    ));
    // The actor starts first: alive at once, not ready without a learner.
    procs.0.push(spawn(
        &[
            "actor",
            "run",
            "--learner",
            &format!("http://{learner}"),
            "--verifier",
            &format!("http://{verifier}"),
            "--tokenizer",
            &model_arg,
            "--max-prompts",
            "4",
            "--max-backoff-secs",
            "1",
            "--metrics-listen",
            &a(actor_m),
        ],
        &dir.join("actor.log"),
    ));
    let actor_pid = procs.0[2].id().to_string();
    let minute = Duration::from_secs(60);
    wait_for("the actor's liveness", minute, || {
        get(actor_m, "/healthz", None).is_some_and(|(code, _)| code == 200)
    });
    assert_eq!(get(actor_m, "/readyz", None).unwrap().0, 503);
    let actor_before = scrape(actor_m, false);
    assert_eq!(sample(&actor_before, "prime_actor_registered"), Some(0.0));
    wait_for("the verifier's and PRM server's metrics", minute, || {
        get(verifier_m, "/metrics", None).is_some() && get(prm_m, "/metrics", None).is_some()
    });
    let verifier_before = scrape(verifier_m, false);
    let prm_before = scrape(prm_m, false);
    assert_eq!(
        sample(&verifier_before, "prime_verifier_items_graded_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&prm_before, "prime_prm_responses_scored_total"),
        Some(0.0)
    );

    procs.0.push(spawn(
        &[
            "learner",
            "serve",
            "--config",
            &config_arg,
            "--run-dir",
            &run_arg,
            "--listen",
            &a(learner),
            "--metrics-listen",
            &a(learner_m),
        ],
        &dir.join("learner.log"),
    ));
    wait_for("the actor's readiness", Duration::from_secs(240), || {
        get(actor_m, "/readyz", None).is_some_and(|(code, _)| code == 200)
    });
    // The actor holds the step's four items: nothing waits.
    wait_for("the actor keeping up", Duration::from_secs(120), || {
        let text = get(learner_m, "/metrics", None)
            .map(|r| r.1)
            .unwrap_or_default();
        sample(&text, "prime_learner_in_flight") == Some(4.0)
            && sample(&text, "prime_learner_work_backlog") == Some(0.0)
    });
    // Frozen holding work, its leases run out: the step's work waits again.
    let mut tries = 0u64;
    wait_for(
        "the actor frozen holding work",
        Duration::from_secs(120),
        || {
            tries += 1;
            std::thread::sleep(Duration::from_millis(10 + tries * 37 % 400));
            Command::new("kill")
                .args(["-STOP", &actor_pid])
                .status()
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if learner_sample(learner_m, "in_flight") >= 1.0 {
                return true;
            }
            Command::new("kill")
                .args(["-CONT", &actor_pid])
                .status()
                .unwrap();
            false
        },
    );
    wait_for("the backlog after the leases ran out", minute, || {
        let text = get(learner_m, "/metrics", None)
            .map(|r| r.1)
            .unwrap_or_default();
        let buffered = sample(&text, "prime_learner_groups_buffered").unwrap_or(4.0);
        sample(&text, "prime_learner_in_flight") == Some(0.0)
            && sample(&text, "prime_learner_work_backlog") == Some(4.0 - buffered)
            && buffered < 4.0
    });
    Command::new("kill")
        .args(["-CONT", &actor_pid])
        .status()
        .unwrap();
    wait_for("two steps", Duration::from_secs(300), || {
        step_records(&run_dir).len() >= 2
    });

    // Two responses scored by the PRM server in one request.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = prime_proto::client::lazy_channel(
            "prm-server",
            &format!("http://{prm}"),
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let pair = |id: &str, response: Vec<i64>| prime_proto::v1::RewardPair {
            id: id.into(),
            prompt_ids: vec![5, 6, 7],
            response_ids: response,
            step_ends: vec![],
        };
        prime_proto::client::prm_client(channel)
            .process_rewards(prime_proto::v1::ProcessRewardsRequest {
                pairs: vec![pair("a", vec![8, 9]), pair("b", vec![10, 11, 12])],
                step_split: "tokens".into(),
            })
            .await
            .unwrap();
    });

    // With the actor frozen the learner, the verifier and the PRM server go quiet; the actor
    // is scraped after it resumed. Counters only grow and each response is sampled, then
    // graded, then submitted, so the learner's figures (first) are at most the verifier's, and
    // those at most the actor's (last).
    Command::new("kill")
        .args(["-STOP", &actor_pid])
        .status()
        .unwrap();
    let (learner_txt, learner_om) = stable_scrape(learner_m);
    let (verifier_txt, verifier_om) = stable_scrape(verifier_m);
    let (prm_txt, prm_om) = stable_scrape(prm_m);
    Command::new("kill")
        .args(["-CONT", &actor_pid])
        .status()
        .unwrap();
    let (actor_txt, actor_om) = stable_scrape(actor_m);
    let texts = [
        ("learner.txt", learner_txt),
        ("learner.om", learner_om),
        ("actor.txt", actor_txt),
        ("actor.om", actor_om),
        ("verifier.txt", verifier_txt),
        ("verifier.om", verifier_om),
        ("prm.txt", prm_txt),
        ("prm.om", prm_om),
    ];
    let refs: Vec<(&str, &str)> = texts.iter().map(|(f, t)| (*f, t.as_str())).collect();
    let parsed = parse_all(dir, &refs);
    let (learner_f, actor_f, verifier_f, prm_f) = (
        &parsed["learner.txt"],
        &parsed["actor.txt"],
        &parsed["verifier.txt"],
        &parsed["prm.txt"],
    );
    for role in ["learner", "actor", "verifier", "prm"] {
        check_formats_agree(
            role,
            &parsed[&format!("{role}.txt")],
            &parsed[&format!("{role}.om")],
        );
    }
    // The broadcast's families appear only when it is on (it is off here).
    let broadcast = [
        "prime_learner_broadcast_rounds_total",
        "prime_learner_broadcast_failed_rounds_total",
        "prime_learner_broadcast_groups_total",
        "prime_learner_broadcast_sent_bytes_total",
        "prime_learner_broadcast_members",
        "prime_learner_broadcast_waiting",
        "prime_learner_broadcast_duration_seconds",
    ];
    check_documented("learner", learner_f, "prime_learner_", &broadcast);
    check_documented("actor", actor_f, "prime_actor_", &[]);
    check_documented("verifier", verifier_f, "prime_verifier_", &[]);
    check_documented("prm-server", prm_f, "prime_prm_", &[]);

    // The learner: steps, groups by outcome, and the responses behind them.
    let l = |name: &str, labels: &[(&str, &str)]| value(learner_f, name, labels);
    assert!(l("prime_learner_step", &[]) >= 2.0);
    assert!(l("prime_learner_train_duration_seconds_count", &[]) >= 2.0);
    assert!(l("prime_learner_rollout_duration_seconds_count", &[]) >= 2.0);
    let groups = |o: &str| l("prime_learner_groups_total", &[("outcome", o)]);
    assert!(groups("kept") >= 8.0, "two steps of four groups");
    assert_eq!(groups("filtered"), 0.0, "the filter is off");
    assert_eq!(groups("rejected"), 0.0);
    assert!(
        l("prime_learner_work_reissued_total", &[]) >= 1.0,
        "the frozen actor's work"
    );
    let judged = groups("kept") + groups("duplicate") + groups("stale");
    let received = l("prime_learner_response_length_tokens_count", &[]);
    assert_eq!(received, 3.0 * judged, "three responses per group");

    // The actor: what it sampled is what the learner received, token for token.
    let ac = |name: &str, labels: &[(&str, &str)]| value(actor_f, name, labels);
    assert_eq!(ac("prime_actor_registered", &[]), 1.0);
    assert_eq!(ac("prime_actor_registrations_total", &[]), 1.0);
    let batches = ac("prime_actor_batches_total", &[]);
    assert!(batches >= 2.0);
    for phase in ["waiting", "weights", "sampling", "grading", "submitting"] {
        let count = "prime_actor_batch_phase_duration_seconds_count";
        assert_eq!(ac(count, &[("phase", phase)]), batches, "{phase}");
    }
    let accepted = ac("prime_actor_groups_total", &[("outcome", "accepted")]);
    assert!(accepted >= 8.0);
    assert_eq!(
        ac("prime_actor_groups_total", &[("outcome", "rejected")]),
        0.0
    );
    let responses = ac("prime_actor_responses_total", &[]);
    assert_eq!(
        responses,
        ac("prime_actor_response_length_tokens_count", &[])
    );
    assert_eq!(
        ac("prime_actor_generated_tokens_total", &[]),
        ac("prime_actor_response_length_tokens_sum", &[])
    );
    assert!(ac("prime_actor_weight_updates_total", &[("source", "grpc")]) >= 2.0);
    assert!(ac("prime_actor_policy_version", &[]) >= 1.0);

    // The verifier graded what the actor sampled before the learner received it; the PRM
    // server scored two responses.
    let v = |name: &str| value(verifier_f, name, &[]);
    let graded = v("prime_verifier_items_graded_total");
    assert!(
        received <= graded && graded <= responses,
        "{received} {graded} {responses}"
    );
    assert!(graded >= 24.0, "two steps of four prompts times three");
    assert_eq!(v("prime_verifier_grade_duration_seconds_count"), graded);
    assert_eq!(v("prime_verifier_in_flight"), 0.0);
    let p = |name: &str| value(prm_f, name, &[]);
    assert_eq!(p("prime_prm_responses_scored_total"), 2.0);
    assert_eq!(p("prime_prm_tokens_scored_total"), 5.0);
    assert_eq!(p("prime_prm_request_duration_seconds_count"), 1.0);
    assert_eq!(p("prime_prm_batch_size_responses_sum"), 2.0);
    assert_eq!(p("prime_prm_errors_total"), 0.0);
}
