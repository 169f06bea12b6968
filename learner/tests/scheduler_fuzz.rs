//! The scheduler under random traffic from several actors: good groups, damaged ones,
//! resubmissions, groups for the wrong actor or version, leases running out, batches taken and
//! versions published in between. Whatever the order, it never panics, every outcome is
//! counted in exactly one counter, no hand-out and no prompt of an epoch is trained on twice,
//! and every batch holds B groups of the version it trains.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use prime_algo::FilterConfig;
use prime_learner::scheduler::{Group, Prompt, Pull, Scheduler, SchedulerConfig, Submitted, Work};
use prime_learner::{ScoredGroup, ScoredResponse};
use proptest::prelude::*;

const K: u32 = 3;
const VOCAB: i64 = 50;
const MAX_TOKENS: usize = 6;

fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt {
            prompt_ids: vec![1 + i as i64 % 40, 2],
            ground_truth: i.to_string(),
            ability: prime_verifier::Ability::Math,
            data_source: String::new(),
            extra_info: String::new(),
        })
        .collect()
}

/// What a random client does next.
#[derive(Debug, Clone)]
enum Op {
    Pull {
        actor: usize,
        max: usize,
    },
    /// Submit for the `work`-th outstanding item (modulo), damaged by `damage`.
    Submit {
        work: usize,
        correct: u32,
        damage: u8,
    },
    /// Submit a group that was already sent once.
    Resubmit {
        which: usize,
    },
    Advance {
        seconds: u64,
    },
    Train,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 1..4usize).prop_map(|(actor, max)| Op::Pull { actor, max }),
        (any::<usize>(), 0..=K, 0..14u8).prop_map(|(work, correct, damage)| {
            Op::Submit {
                work,
                correct,
                damage,
            }
        }),
        // Good groups often, so batches fill and versions move on.
        (any::<usize>(), 1..K).prop_map(|(work, correct)| Op::Submit {
            work,
            correct,
            damage: 10
        }),
        any::<usize>().prop_map(|which| Op::Resubmit { which }),
        (1..8u64).prop_map(|seconds| Op::Advance { seconds }),
        Just(Op::Train),
    ]
}

/// A group for `work`, damaged in one of several ways when `damage` < 9 (6: a version from
/// the future).
fn group(work: &Work, actor_id: &str, version: u64, correct: u32, damage: u8) -> Group {
    let mut group = Group {
        group_id: work.work_id.clone(),
        actor_id: actor_id.into(),
        policy_version: version,
        scored: ScoredGroup {
            prompt_ids: work.prompt.prompt_ids.clone(),
            responses: (0..work.k)
                .map(|i| ScoredResponse {
                    ids: vec![3, 4, 5],
                    sampling_logprobs: vec![-0.1, -0.2, -0.3],
                    score: if i < correct { 1.0 } else { 0.0 },
                    truncated: false,
                })
                .collect(),
        },
    };
    match damage {
        0 => group.scored.responses[0].ids[0] = VOCAB,
        1 => group.scored.responses[1].ids[2] = -1,
        2 => group.scored.responses[0].ids = vec![3; MAX_TOKENS + 1],
        3 => {
            group.scored.responses.pop();
        }
        4 => group.scored.responses[2].sampling_logprobs[0] = f32::INFINITY,
        5 => group.scored.responses[0].score = 2.0,
        6 => group.policy_version = u64::MAX / 2,
        7 => group.scored.prompt_ids.push(7),
        8 => group.group_id.push('x'),
        _ => {}
    }
    if damage == 4 || damage == 2 {
        // keep lengths consistent so only the intended rule fires
        let n = group.scored.responses[0].ids.len();
        group.scored.responses[0].sampling_logprobs.resize(n, -0.1);
    }
    group
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_traffic_keeps_the_books_straight(
        ops in proptest::collection::vec(op(), 1..120),
        batch_groups in 1..4usize,
        max_staleness in 0..2u64,
    ) {
        let config = SchedulerConfig {
            batch_groups,
            k: K,
            max_staleness,
            lease: Duration::from_secs(10),
            filter: FilterConfig::default(),
            seed: 3,
            oversample: 1.0,
            max_outstanding_prompts: 0,
            vocab_size: VOCAB,
            max_response_tokens: MAX_TOKENS,
        };
        // More prompts than the ops can pull, so the run stays within one epoch.
        let mut s = Scheduler::new(prompts(400), config, None).unwrap();
        let mut now = Instant::now();
        let actors: Vec<String> = (0..3).map(|i| s.register(&format!("a{i}"), now)).collect();
        let mut outstanding: Vec<(usize, Work, u64)> = Vec::new();
        let mut sent: Vec<Group> = Vec::new();
        let mut outcomes = [0u64; 5];
        let mut trained_work: HashSet<String> = HashSet::new();
        let mut trained_prompts: HashSet<u64> = HashSet::new();
        let mut version = 0u64;

        for op in ops {
            match op {
                Op::Pull { actor, max } => {
                    if let Pull::Work { policy_version, items } = s.pull(&actors[actor], max, now) {
                        prop_assert_eq!(policy_version, version);
                        for work in items {
                            prop_assert_eq!(work.k, K);
                            outstanding.push((actor, work, policy_version));
                        }
                    }
                }
                Op::Submit { work, correct, damage } => {
                    if outstanding.is_empty() {
                        continue;
                    }
                    let (owner, work, pulled_at) = outstanding[work % outstanding.len()].clone();
                    // Sometimes the wrong actor submits.
                    let submitter = if damage == 9 { (owner + 1) % 3 } else { owner };
                    let g = group(&work, &actors[submitter], pulled_at, correct, damage);
                    let outcome = s.submit(g.clone(), now);
                    if damage < 9 || submitter != owner {
                        prop_assert!(
                            !matches!(outcome, Submitted::Kept | Submitted::Filtered),
                            "a damaged group counted: damage {} -> {:?}", damage, outcome
                        );
                    }
                    record(&mut outcomes, &outcome);
                    sent.push(g);
                }
                Op::Resubmit { which } => {
                    if sent.is_empty() {
                        continue;
                    }
                    let g = sent[which % sent.len()].clone();
                    let outcome = s.submit(g, now);
                    prop_assert!(
                        !matches!(outcome, Submitted::Kept | Submitted::Filtered),
                        "a resubmission counted: {:?}", outcome
                    );
                    record(&mut outcomes, &outcome);
                }
                Op::Advance { seconds } => {
                    now += Duration::from_secs(seconds);
                    s.expire(now);
                }
                Op::Train => {
                    if let Some(batch) = s.take_batch() {
                        prop_assert_eq!(batch.groups.len(), batch_groups);
                        prop_assert_eq!(batch.policy_version, version);
                        for (g, index) in batch.groups.iter().zip(&batch.prompt_indices) {
                            prop_assert!(trained_work.insert(g.group_id.clone()), "trained twice: {}", g.group_id);
                            prop_assert!(trained_prompts.insert(*index), "prompt {} trained twice in one epoch", index);
                            prop_assert!(g.policy_version + max_staleness >= version);
                        }
                        version += 1;
                        s.publish(version);
                    }
                }
            }
            let c = s.status(now).counters;
            // Kept groups that age out before training are counted stale later as well.
            prop_assert_eq!(
                [c.accepted, c.filtered, c.duplicates, c.rejected],
                [outcomes[0], outcomes[1], outcomes[2], outcomes[4]],
                "counters disagree with the outcomes returned"
            );
            prop_assert!(c.stale >= outcomes[3]);
        }
    }
}

fn record(outcomes: &mut [u64; 5], outcome: &Submitted) {
    let i = match outcome {
        Submitted::Kept => 0,
        Submitted::Filtered => 1,
        Submitted::Duplicate => 2,
        Submitted::Stale => 3,
        Submitted::Rejected(_) => 4,
    };
    outcomes[i] += 1;
}
