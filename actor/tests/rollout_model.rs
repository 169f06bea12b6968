//! One batch's rollout steps on a real (tiny, random) policy: seeded sampling of the batch rows
//! is reproducible, finish reasons and truncation reach the groups unchanged, and responses
//! are decoded for the verifier without special or unknown tokens.
mod common;

use common::{tiny_model, torch_rng, write_tokenizer, IM_END};
use prime_actor::rollout::{
    assemble_groups, batch_seed, response_text, sample_rows, sampling_params,
};
use prime_model::{generate, FinishReason, Tokenizer};
use prime_proto::v1 as pb;

fn item(work_id: &str, prompt: &[i64], k: u32) -> pb::WorkItem {
    pb::WorkItem {
        work_id: work_id.into(),
        prompt_ids: prompt.to_vec(),
        ground_truth: "4".into(),
        ability: pb::GradeAbility::Math as i32,
        k,
        ..Default::default()
    }
}

fn wire(max_new_tokens: u32, temperature: f64, stop: &[i64]) -> pb::SamplingParams {
    pb::SamplingParams {
        max_new_tokens,
        temperature,
        top_p: 1.0,
        top_k: 0,
        seed: Some(11),
        stop_token_ids: stop.to_vec(),
    }
}

#[test]
fn a_seeded_batch_samples_again_exactly_and_other_batches_differ() {
    let _rng = torch_rng();
    let lm = tiny_model(1);
    let items = [item("a", &[1, 2, 3], 3), item("b", &[4, 5], 2)];
    let rows = sample_rows(&items).unwrap();
    // No stop tokens in the batch: the policy's EOS (<|im_end|>) ends responses.
    let mut params = sampling_params(&wire(8, 1.0, &[]), &lm.eos_token_ids()).unwrap();
    assert_eq!(params.stop_token_ids, [IM_END]);

    params.seed = Some(batch_seed(11, 1, &["a", "b"]));
    let first = generate(&lm.model, &rows, &params).unwrap();
    let again = generate(&lm.model, &rows, &params).unwrap();
    assert_eq!(first, again);

    params.seed = Some(batch_seed(11, 2, &["a", "b"]));
    let next_version = generate(&lm.model, &rows, &params).unwrap();
    assert_ne!(first, next_version);

    // The K rows of one prompt are independent draws, not copies.
    assert!(first[0] != first[1] || first[1] != first[2]);
    for g in &first {
        let stops = g.token_ids.iter().filter(|&&t| t == IM_END).count();
        match g.finish_reason {
            FinishReason::Stop => {
                assert_eq!(stops, 1);
                assert_eq!(*g.token_ids.last().unwrap(), IM_END);
            }
            FinishReason::Length => {
                assert_eq!(stops, 0);
                assert_eq!(g.token_ids.len(), 8);
            }
        }
    }
}

#[test]
fn stops_and_truncations_reach_the_groups() {
    let _rng = torch_rng();
    let lm = tiny_model(2);
    let items = [item("a", &[1, 2, 3], 1), item("b", &[7, 9, 30, 4], 2)];
    let rows = sample_rows(&items).unwrap();
    // Greedy, no stop token: every row runs to max_new_tokens.
    let free = sampling_params(&wire(4, 0.0, &[60]), &[]).unwrap();
    let greedy = generate(&lm.model, &rows, &free).unwrap();
    // Stop on row 0's first greedy token: row 0 ends after it; rows that never produce it are
    // truncated at 4 tokens.
    let stop = greedy[0].token_ids[0];
    let params = sampling_params(&wire(4, 0.0, &[stop]), &[]).unwrap();
    let generations = generate(&lm.model, &rows, &params).unwrap();
    assert_eq!(generations[0].token_ids, [stop]);
    assert_eq!(generations[0].finish_reason, FinishReason::Stop);
    let truncated: Vec<usize> = (0..rows.len())
        .filter(|&r| !greedy[r].token_ids.contains(&stop))
        .collect();
    assert!(
        !truncated.is_empty(),
        "pick prompts whose greedy responses avoid {stop}"
    );

    let scores = [1.0, 0.0, 0.5];
    let groups = assemble_groups("actor-7", 5, &items, generations.clone(), &scores).unwrap();
    let responses: Vec<&pb::Response> = groups.iter().flat_map(|g| &g.responses).collect();
    assert_eq!(responses.len(), 3);
    for (row, (response, generation)) in responses.iter().zip(&generations).enumerate() {
        assert_eq!(response.token_ids, generation.token_ids);
        assert_eq!(response.sampling_logprobs, generation.logprobs);
        assert!(response.sampling_logprobs.iter().all(|&l| l <= 0.0));
        assert_eq!(response.score, scores[row]);
        let expected = if truncated.contains(&row) {
            assert_eq!(response.token_ids.len(), 4);
            pb::FinishReason::Length
        } else {
            assert_eq!(*response.token_ids.last().unwrap(), stop);
            pb::FinishReason::Stop
        };
        assert_eq!(response.finish_reason, expected as i32, "row {row}");
    }
    assert!(groups
        .iter()
        .all(|g| g.actor_id == "actor-7" && g.policy_version == 5));
    assert_eq!(groups[1].prompt_ids, [7, 9, 30, 4]);
}

#[test]
fn responses_are_decoded_without_special_or_unknown_tokens() {
    let _rng = torch_rng();
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        response_text(&tokenizer, &[1, 2, 3, 4, IM_END]).unwrap(),
        "the answer is \\boxed{4}"
    );
    // 40 is a model id past the tokenizer's 7 entries; -1 is no id at all.
    assert_eq!(
        response_text(&tokenizer, &[1, IM_END, 40, 2, -1]).unwrap(),
        "the answer"
    );
}
