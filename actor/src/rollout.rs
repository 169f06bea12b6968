//! The pure steps of rolling out one work batch: sampling parameters and the sampler's seed,
//! the batch rows (each prompt K times), the verifier's items and scores, and the rollout
//! groups sent to the learner. No I/O and no model: the loop in [`crate::run`] does those.
use prime_model::{FinishReason, Generation, SamplingParams, Tokenizer};
use prime_proto::v1 as pb;
use prime_verifier::grade::GradeItem;
use prime_verifier::service::{ability_from_proto, item_to_proto};

use crate::error::{ActorError, Result};

/// The model crate's sampling parameters for a work batch. The batch's stop tokens end
/// responses; when it names none, `default_stop_token_ids` (the policy config's EOS) do, so
/// that responses are not all cut at `max_new_tokens`. The seed is left unset:
/// [`batch_seed`] derives the one the sampler gets.
pub fn sampling_params(
    wire: &pb::SamplingParams,
    default_stop_token_ids: &[i64],
) -> Result<SamplingParams> {
    if wire.max_new_tokens == 0 {
        return Err(ActorError::Protocol(
            "sampling.max_new_tokens is 0: responses would be empty".into(),
        ));
    }
    let stop_token_ids = if wire.stop_token_ids.is_empty() {
        default_stop_token_ids.to_vec()
    } else {
        wire.stop_token_ids.clone()
    };
    let params = SamplingParams {
        max_new_tokens: wire.max_new_tokens as usize,
        temperature: wire.temperature,
        top_p: wire.top_p,
        top_k: wire.top_k,
        seed: None,
        stop_token_ids,
    };
    // A temperature, top-p or top-k the sampler refuses comes from the learner's config:
    // every batch would be given up and pulled again, forever. A configuration error is
    // fatal, so the actor stops with the reason instead.
    params.validate().map_err(|e| {
        ActorError::Config(format!(
            "the learner hands out sampling parameters this actor cannot use ({e}); fix the \
             learner's [learner.rollout] config"
        ))
    })?;
    Ok(params)
}

/// The sampler's seed for one batch, derived from the run's `seed`, the policy version and
/// the batch's work ids (in order). Reseeding every batch with the run's seed alone would
/// replay the same random stream for every batch; mixing in what the batch is makes each
/// batch's draws reproducible and different from every other batch's.
///
/// The hash is FNV-1a (64 bit) over `seed` and `policy_version` as little-endian bytes and each
/// id followed by 0xFF (a byte UTF-8 never contains, so ids cannot run into each other), then
/// the SplitMix64 finaliser to spread FNV's weak high bits.
pub fn batch_seed(seed: u64, policy_version: u64, work_ids: &[&str]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(FNV_PRIME);
        }
    };
    feed(&seed.to_le_bytes());
    feed(&policy_version.to_le_bytes());
    for id in work_ids {
        feed(id.as_bytes());
        feed(&[0xff]);
    }
    splitmix64(hash)
}

/// SplitMix64's output function (Steele, Lea and Flood, 2014).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rows of the batch's one `generate` call: each item's prompt `k` times, item after item.
/// The K copies are adjacent, so the sampler prefills each prompt once and forks its KV cache
/// into the K rows (see `prime_model::generate_batched`).
pub fn sample_rows(items: &[pb::WorkItem]) -> Result<Vec<Vec<i64>>> {
    let mut rows = Vec::with_capacity(items.iter().map(|i| i.k as usize).sum());
    for item in items {
        if item.k == 0 {
            return Err(ActorError::Protocol(format!(
                "work item {} asks for k = 0 responses",
                item.work_id
            )));
        }
        rows.extend(std::iter::repeat_n(
            item.prompt_ids.clone(),
            item.k as usize,
        ));
    }
    Ok(rows)
}

/// The text the verifier grades: the response decoded without special tokens. Ids the
/// tokenizer does not know (a model vocabulary padded past the tokenizer's) have no text and
/// are left out.
pub fn response_text(tokenizer: &Tokenizer, token_ids: &[i64]) -> Result<String> {
    let vocab = tokenizer.vocab_size() as i64;
    let known: Vec<i64> = token_ids
        .iter()
        .copied()
        .filter(|&id| (0..vocab).contains(&id))
        .collect();
    Ok(tokenizer.decode(&known, true)?)
}

/// Id of sample `index` of a work item in a grade request.
pub fn grade_item_id(work_id: &str, index: usize) -> String {
    format!("{work_id}/{index}")
}

/// One grade item per row, in row order: `texts` are the decoded responses of
/// [`sample_rows`]'s rows. An ability the verifier does not know is sent unspecified; the
/// verifier answers it with an error result and score 0.
pub fn grade_items(items: &[pb::WorkItem], texts: &[String]) -> Result<Vec<pb::GradeItem>> {
    let rows: usize = items.iter().map(|i| i.k as usize).sum();
    if texts.len() != rows {
        return Err(ActorError::Protocol(format!(
            "{} responses for {rows} rows",
            texts.len()
        )));
    }
    let mut texts = texts.iter();
    let mut out = Vec::with_capacity(rows);
    for item in items {
        let ability = ability_from_proto(item.ability);
        if ability.is_none() {
            tracing::warn!(work_id = %item.work_id, ability = item.ability, "unknown ability");
        }
        for index in 0..item.k as usize {
            let mut graded = item_to_proto(&GradeItem {
                id: grade_item_id(&item.work_id, index),
                ability,
                response: texts.next().expect("lengths checked").clone(),
                ground_truth: item.ground_truth.clone(),
            });
            graded.data_source = item.data_source.clone();
            graded.extra_info = item.extra_info.clone();
            out.push(graded);
        }
    }
    Ok(out)
}

/// The results of a `Grade` call, unless the verifier could not grade one of them (its sandbox
/// failed, say): then `UNAVAILABLE`, so the batch is graded again rather than trained on as
/// zeros that are no verdict.
pub fn verdicts(results: Vec<pb::GradeResult>) -> Result<Vec<pb::GradeResult>, tonic::Status> {
    match results
        .iter()
        .find(|r| r.outcome == pb::GradeOutcome::Unavailable as i32)
    {
        Some(r) => Err(tonic::Status::unavailable(format!(
            "the verifier could not grade {}: {}",
            r.id, r.reason
        ))),
        None => Ok(results),
    }
}

/// The scores of `requested`, checked against the verifier's `results`: one per item, in
/// request order, each in [0, 1] (see [`verdicts`] for results that are no verdict).
pub fn scores_from_grades(
    requested: &[pb::GradeItem],
    results: &[pb::GradeResult],
) -> Result<Vec<f32>> {
    if results.len() != requested.len() {
        return Err(ActorError::Protocol(format!(
            "verifier answered {} results for {} items",
            results.len(),
            requested.len()
        )));
    }
    requested
        .iter()
        .zip(results)
        .map(|(item, result)| {
            if result.id != item.id {
                return Err(ActorError::Protocol(format!(
                    "verifier answered {:?} where {:?} was asked",
                    result.id, item.id
                )));
            }
            if !(0.0..=1.0).contains(&result.score) {
                return Err(ActorError::Protocol(format!(
                    "score {} of {} is outside [0, 1]",
                    result.score, item.id
                )));
            }
            if result.outcome != pb::GradeOutcome::Graded as i32 {
                tracing::debug!(id = %item.id, reason = %result.reason, "not graded; score 0");
            }
            Ok(result.score as f32)
        })
        .collect()
}

/// The wire form of a finish reason: `Length` marks a response truncated at
/// `max_new_tokens`.
pub fn finish_reason_to_proto(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    }
}

/// The rollout groups of a batch: item `i`'s group holds the generations and scores of its
/// `k` rows (rows laid out as [`sample_rows`] does), sampled with `policy_version`.
pub fn assemble_groups(
    actor_id: &str,
    policy_version: u64,
    items: &[pb::WorkItem],
    generations: Vec<Generation>,
    scores: &[f32],
) -> Result<Vec<pb::RolloutGroup>> {
    let rows: usize = items.iter().map(|i| i.k as usize).sum();
    if generations.len() != rows || scores.len() != rows {
        return Err(ActorError::Protocol(format!(
            "{} generations and {} scores for {rows} rows",
            generations.len(),
            scores.len()
        )));
    }
    let mut rows = generations.into_iter().zip(scores);
    let mut groups = Vec::with_capacity(items.len());
    for item in items {
        let mut responses = Vec::with_capacity(item.k as usize);
        for (generation, &score) in rows.by_ref().take(item.k as usize) {
            if generation.token_ids.is_empty()
                || generation.token_ids.len() != generation.logprobs.len()
            {
                return Err(ActorError::Protocol(format!(
                    "work item {}: a response of {} tokens with {} log-probs",
                    item.work_id,
                    generation.token_ids.len(),
                    generation.logprobs.len()
                )));
            }
            responses.push(pb::Response {
                token_ids: generation.token_ids,
                sampling_logprobs: generation.logprobs,
                score,
                finish_reason: finish_reason_to_proto(generation.finish_reason) as i32,
            });
        }
        groups.push(pb::RolloutGroup {
            group_id: item.work_id.clone(),
            actor_id: actor_id.to_string(),
            policy_version,
            prompt_ids: item.prompt_ids.clone(),
            responses,
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(
        work_id: &str,
        prompt: &[i64],
        k: u32,
        ability: pb::GradeAbility,
        truth: &str,
    ) -> pb::WorkItem {
        pb::WorkItem {
            work_id: work_id.into(),
            prompt_ids: prompt.to_vec(),
            ground_truth: truth.into(),
            ability: ability as i32,
            k,
            ..Default::default()
        }
    }

    fn generation(ids: &[i64], reason: FinishReason) -> Generation {
        Generation {
            token_ids: ids.to_vec(),
            logprobs: ids.iter().map(|&i| -(i as f32) / 10.0).collect(),
            finish_reason: reason,
        }
    }

    #[test]
    fn batch_seed_matches_the_hash_computed_in_python() {
        // Python, same definition: FNV-1a 64 over seed.to_bytes(8, 'little') +
        // version.to_bytes(8, 'little') + b''.join(id.encode() + b'\xff'), then SplitMix64.
        assert_eq!(batch_seed(42, 3, &["w-1", "w-2"]), 3365222194398521243);
        assert_eq!(batch_seed(0, 0, &[]), 4725398728194510117);
    }

    #[test]
    fn batch_seed_depends_on_every_input_and_on_id_boundaries() {
        let base = batch_seed(7, 1, &["a", "b"]);
        assert_eq!(base, batch_seed(7, 1, &["a", "b"]));
        let others = [
            batch_seed(8, 1, &["a", "b"]),
            batch_seed(7, 2, &["a", "b"]),
            batch_seed(7, 1, &["b", "a"]),
            batch_seed(7, 1, &["ab"]),
            batch_seed(7, 1, &["a", "b", ""]),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(base, *other, "variant {i}");
        }
        assert_ne!(
            batch_seed(7, 1, &["ab", "c"]),
            batch_seed(7, 1, &["a", "bc"])
        );
    }

    #[test]
    fn sampling_params_take_the_batch_stop_tokens_or_the_default() {
        let wire = pb::SamplingParams {
            max_new_tokens: 12,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 5,
            seed: Some(3),
            stop_token_ids: vec![4, 9],
        };
        let params = sampling_params(&wire, &[1]).unwrap();
        assert_eq!(
            params,
            SamplingParams {
                max_new_tokens: 12,
                temperature: 0.7,
                top_p: 0.9,
                top_k: 5,
                seed: None,
                stop_token_ids: vec![4, 9],
            }
        );
        let no_stops = pb::SamplingParams {
            stop_token_ids: vec![],
            ..wire.clone()
        };
        assert_eq!(
            sampling_params(&no_stops, &[1, 2]).unwrap().stop_token_ids,
            [1, 2]
        );
        let empty = pb::SamplingParams {
            max_new_tokens: 0,
            ..wire.clone()
        };
        assert!(matches!(
            sampling_params(&empty, &[1]),
            Err(ActorError::Protocol(_))
        ));
        // Values the sampler refuses stop the actor (a fatal config error) instead of having
        // it give up every batch and pull it again.
        for bad in [
            pb::SamplingParams {
                top_p: 0.0,
                ..wire.clone()
            },
            pb::SamplingParams {
                temperature: f64::NAN,
                ..wire.clone()
            },
            pb::SamplingParams {
                top_k: -1,
                ..wire.clone()
            },
        ] {
            let error = sampling_params(&bad, &[1]).unwrap_err();
            assert!(matches!(error, ActorError::Config(_)), "{error}");
            assert!(error.is_fatal(), "{error}");
            assert!(error.to_string().contains("learner.rollout"), "{error}");
        }
    }

    #[test]
    fn rows_repeat_each_prompt_k_times_in_item_order() {
        let items = [
            item("a", &[1, 2], 2, pb::GradeAbility::Math, "1"),
            item("b", &[3], 3, pb::GradeAbility::Math, "2"),
        ];
        let rows = sample_rows(&items).unwrap();
        assert_eq!(
            rows,
            vec![vec![1, 2], vec![1, 2], vec![3], vec![3], vec![3]]
        );
        let zero = [item("z", &[1], 0, pb::GradeAbility::Math, "1")];
        assert!(sample_rows(&zero).is_err());
    }

    #[test]
    fn grade_items_follow_the_rows_with_ids_abilities_and_truths() {
        let items = [
            item("a", &[1], 2, pb::GradeAbility::Math, "4"),
            item("b", &[1], 1, pb::GradeAbility::Code, "{}"),
            // A value this build does not know.
            pb::WorkItem {
                ability: 7,
                ..item("c", &[1], 1, pb::GradeAbility::Unspecified, "x")
            },
        ];
        let texts: Vec<String> = ["r0", "r1", "r2", "r3"].map(String::from).to_vec();
        let graded = grade_items(&items, &texts).unwrap();
        let summary: Vec<(&str, i32, &str, &str)> = graded
            .iter()
            .map(|g| {
                (
                    g.id.as_str(),
                    g.ability,
                    g.response.as_str(),
                    g.ground_truth.as_str(),
                )
            })
            .collect();
        let math = pb::GradeAbility::Math as i32;
        let code = pb::GradeAbility::Code as i32;
        let unknown = pb::GradeAbility::Unspecified as i32;
        assert_eq!(
            summary,
            [
                ("a/0", math, "r0", "4"),
                ("a/1", math, "r1", "4"),
                ("b/0", code, "r2", "{}"),
                ("c/0", unknown, "r3", "x"),
            ]
        );
        assert!(grade_items(&items, &texts[..3]).is_err());
    }

    fn result(id: &str, score: f64, outcome: pb::GradeOutcome) -> pb::GradeResult {
        pb::GradeResult {
            id: id.into(),
            score,
            outcome: outcome as i32,
            ..Default::default()
        }
    }

    #[test]
    fn results_that_are_no_verdict_are_graded_again() {
        let graded = vec![
            result("a/0", 1.0, pb::GradeOutcome::Graded),
            result("a/1", 0.0, pb::GradeOutcome::Timeout),
            result("a/2", 0.0, pb::GradeOutcome::Error),
        ];
        assert_eq!(verdicts(graded.clone()).unwrap(), graded);
        let mut unavailable = graded;
        unavailable[1] = result("a/1", 0.0, pb::GradeOutcome::Unavailable);
        let status = verdicts(unavailable).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("a/1"), "{status}");
    }

    #[test]
    fn scores_are_checked_against_the_request() {
        let items = [item("a", &[1], 2, pb::GradeAbility::Math, "4")];
        let requested = grade_items(&items, &["x".into(), "y".into()]).unwrap();
        let ok = [
            result("a/0", 1.0, pb::GradeOutcome::Graded),
            result("a/1", 0.0, pb::GradeOutcome::Timeout),
        ];
        assert_eq!(scores_from_grades(&requested, &ok).unwrap(), [1.0, 0.0]);
        let swapped = [ok[1].clone(), ok[0].clone()];
        assert!(scores_from_grades(&requested, &swapped).is_err());
        assert!(scores_from_grades(&requested, &ok[..1]).is_err());
        let out_of_range = [ok[0].clone(), result("a/1", 1.5, pb::GradeOutcome::Graded)];
        assert!(scores_from_grades(&requested, &out_of_range).is_err());
        let nan = [
            ok[0].clone(),
            result("a/1", f64::NAN, pb::GradeOutcome::Graded),
        ];
        assert!(scores_from_grades(&requested, &nan).is_err());
    }

    #[test]
    fn groups_hold_each_items_rows_with_scores_and_finish_reasons() {
        let items = [
            item("a", &[5, 6], 2, pb::GradeAbility::Math, "4"),
            item("b", &[7], 1, pb::GradeAbility::Math, "2"),
        ];
        let generations = vec![
            generation(&[1, 2, 3], FinishReason::Length),
            generation(&[4, 0], FinishReason::Stop),
            generation(&[8], FinishReason::Stop),
        ];
        let groups = assemble_groups("actor-1", 9, &items, generations, &[0.0, 1.0, 0.5]).unwrap();
        assert_eq!(groups.len(), 2);
        let a = &groups[0];
        assert_eq!(
            (a.group_id.as_str(), a.actor_id.as_str(), a.policy_version),
            ("a", "actor-1", 9)
        );
        assert_eq!(a.prompt_ids, [5, 6]);
        assert_eq!(a.responses.len(), 2);
        assert_eq!(a.responses[0].token_ids, [1, 2, 3]);
        assert_eq!(a.responses[0].sampling_logprobs, [-0.1, -0.2, -0.3]);
        assert_eq!(a.responses[0].score, 0.0);
        assert_eq!(
            a.responses[0].finish_reason,
            pb::FinishReason::Length as i32
        );
        assert_eq!(a.responses[1].token_ids, [4, 0]);
        assert_eq!(a.responses[1].score, 1.0);
        assert_eq!(a.responses[1].finish_reason, pb::FinishReason::Stop as i32);
        let b = &groups[1];
        assert_eq!(b.group_id, "b");
        assert_eq!(b.responses.len(), 1);
        assert_eq!(b.responses[0].token_ids, [8]);
        assert_eq!(b.responses[0].score, 0.5);
    }

    #[test]
    fn malformed_generations_are_refused() {
        let items = [item("a", &[5], 2, pb::GradeAbility::Math, "4")];
        let two = || {
            vec![
                generation(&[1], FinishReason::Stop),
                generation(&[2], FinishReason::Stop),
            ]
        };
        assert!(assemble_groups("x", 1, &items, two(), &[1.0]).is_err());
        assert!(assemble_groups("x", 1, &items, two()[..1].to_vec(), &[1.0, 1.0]).is_err());
        let mut ragged = two();
        ragged[1].logprobs.push(-1.0);
        assert!(assemble_groups("x", 1, &items, ragged, &[1.0, 1.0]).is_err());
        let mut empty = two();
        empty[0] = generation(&[], FinishReason::Length);
        assert!(assemble_groups("x", 1, &items, empty, &[1.0, 1.0]).is_err());
    }

    #[test]
    fn finish_reasons_map_to_the_wire() {
        assert_eq!(
            finish_reason_to_proto(FinishReason::Stop),
            pb::FinishReason::Stop
        );
        assert_eq!(
            finish_reason_to_proto(FinishReason::Length),
            pb::FinishReason::Length
        );
    }
}
