//! The keys of `metrics.jsonl` and of the TensorBoard scalars: one flat JSON object per
//! record, every figure under the namespaced key verl users know (`actor/pg_loss`,
//! `critic/score/mean`, `response_length/mean`, `timing_s/gen`, ...), beside `kind` (`step`
//! or `eval`) and `step`. docs/metrics.md lists every key.
//!
//! The records themselves ([`Record`](crate::trainer::Record)) keep their Rust field names;
//! [`namespaced`] and [`structured`] translate between the two shapes, so the file reads back
//! exactly (a resumed run replots its history from it).
use serde_json::{Map, Value};

/// Step record fields (of `StepRecord` and its flattened `StepMetrics`) and their keys.
/// `group_versions` is the pair [`OLDEST_VERSION`], [`NEWEST_VERSION`].
pub const STEP_KEYS: &[(&str, &str)] = &[
    ("policy_loss", "actor/pg_loss"),
    ("clip_fraction", "actor/pg_clipfrac"),
    ("approx_kl", "actor/ppo_kl"),
    ("entropy", "actor/entropy"),
    ("policy_grad_norm", "actor/grad_norm"),
    ("policy_lr", "actor/lr"),
    ("sampler_logprob_gap", "actor/sampler_logprob_gap"),
    ("behavior_weight_mean", "actor/behavior_weight_mean"),
    (
        "behavior_weight_truncated",
        "actor/behavior_weight_truncated",
    ),
    ("prm_loss", "prm/loss"),
    ("prm_new_batch_loss", "prm/new_batch_loss"),
    ("prm_new_batch_accuracy", "prm/new_batch_acc"),
    ("prm_new_batch_ranking", "prm/new_batch_ranking"),
    ("prm_accuracy", "prm/dpo_acc"),
    ("prm_abs_accuracy", "prm/dpo_acc_abs"),
    ("prm_grad_norm", "prm/grad_norm"),
    ("prm_lr", "prm/lr"),
    ("prm_reward_mean", "prm/reward/mean"),
    ("prm_reward_std", "prm/reward/std"),
    ("process_reward_abs_mean", "prm/process_reward_abs_mean"),
    ("score_mean", "critic/score/mean"),
    ("score_std", "critic/score/std"),
    ("train_reward", "critic/score/unfiltered_mean"),
    ("return_mean", "critic/returns/mean"),
    ("response_length_mean", "response_length/mean"),
    ("response_tokens", "response_length/tokens"),
    ("groups", "batch/groups"),
    ("responses", "batch/responses"),
    ("groups_seen", "batch/groups_seen"),
    ("filter_pass_rate", "batch/filter_pass_rate"),
    ("policy_version", "batch/policy_version"),
    ("tokens_per_second", "perf/throughput"),
    ("total_tokens", "perf/total_tokens"),
    ("rollout_seconds", "timing_s/gen"),
    ("train_seconds", "timing_s/step"),
    ("time_old_logprobs_s", "timing_s/old_log_prob"),
    ("time_reference_s", "timing_s/ref"),
    ("time_prm_s", "timing_s/update_prm"),
    ("time_advantages_s", "timing_s/adv"),
    ("time_policy_s", "timing_s/update_actor"),
    ("wall_seconds", "timing_s/wall"),
];

/// Oldest policy version among a step's groups (`group_versions[0]`).
pub const OLDEST_VERSION: &str = "batch/oldest_group_version";
/// Newest policy version among a step's groups (`group_versions[1]`).
pub const NEWEST_VERSION: &str = "batch/newest_group_version";

/// Evaluation fields and their keys; `accuracy_by_ability` and `accuracy_by_source` become
/// one key per entry under [`ABILITY_PREFIX`] and [`SOURCE_PREFIX`].
pub const EVAL_KEYS: &[(&str, &str)] = &[
    ("accuracy", "val/accuracy"),
    ("greedy_accuracy", "val/greedy_accuracy"),
    ("problems", "val/problems"),
    ("seconds", "timing_s/eval"),
    ("wall_seconds", "timing_s/eval_wall"),
];

/// `val/accuracy/<ability>`.
pub const ABILITY_PREFIX: &str = "val/accuracy/";
/// `val/test_score/<data_source>`, as verl names the per-source score.
pub const SOURCE_PREFIX: &str = "val/test_score/";

/// The keys of figures a record may lack (`Option` fields): `null` there means not measured.
/// Any other `null` is a number JSON cannot hold (NaN or an infinity).
pub const OPTIONAL_KEYS: &[&str] = &[
    "actor/sampler_logprob_gap",
    "actor/behavior_weight_mean",
    "actor/behavior_weight_truncated",
    "prm/new_batch_ranking",
    "val/greedy_accuracy",
];

/// The fields every record keeps unrenamed.
const PLAIN: &[&str] = &["kind", "step"];

fn rename(map: &mut Map<String, Value>, from: &str, to: &str) {
    if let Some(value) = map.remove(from) {
        map.insert(to.to_string(), value);
    }
}

/// A record in its structured shape (the serde shape of `Record`'s fields, `kind` and `step`
/// included) turned into the flat namespaced object of `metrics.jsonl`. A field the tables do
/// not know is an error, so that a new field cannot slip into the file unnamed.
pub fn namespaced(mut fields: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for key in PLAIN {
        if let Some(value) = fields.remove(*key) {
            out.insert((*key).to_string(), value);
        }
    }
    match out.get("kind").and_then(Value::as_str) {
        Some("step") => {
            if let Some(Value::Array(versions)) = fields.remove("group_versions") {
                let [oldest, newest] = <[Value; 2]>::try_from(versions)
                    .map_err(|_| "group_versions must hold two versions".to_string())?;
                out.insert(OLDEST_VERSION.into(), oldest);
                out.insert(NEWEST_VERSION.into(), newest);
            }
            for (field, key) in STEP_KEYS {
                rename(&mut fields, field, key);
            }
        }
        Some("eval") => {
            for (field, prefix) in [
                ("accuracy_by_ability", ABILITY_PREFIX),
                ("accuracy_by_source", SOURCE_PREFIX),
            ] {
                if let Some(Value::Object(entries)) = fields.remove(field) {
                    for (name, value) in entries {
                        out.insert(format!("{prefix}{name}"), value);
                    }
                }
            }
            for (field, key) in EVAL_KEYS {
                rename(&mut fields, field, key);
            }
        }
        other => return Err(format!("record kind {other:?}: expected step or eval")),
    }
    for (key, value) in fields {
        if !key.contains('/') {
            return Err(format!("record field {key:?} has no namespaced key"));
        }
        out.insert(key, value);
    }
    Ok(out)
}

/// The inverse of [`namespaced`]: a `metrics.jsonl` object back in the structured shape.
pub fn structured(mut keys: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for key in PLAIN {
        if let Some(value) = keys.remove(*key) {
            out.insert((*key).to_string(), value);
        }
    }
    match out.get("kind").and_then(Value::as_str) {
        Some("step") => {
            if let (Some(oldest), Some(newest)) =
                (keys.remove(OLDEST_VERSION), keys.remove(NEWEST_VERSION))
            {
                out.insert("group_versions".into(), Value::Array(vec![oldest, newest]));
            }
            for (field, key) in STEP_KEYS {
                rename(&mut keys, key, field);
            }
        }
        Some("eval") => {
            for (field, key) in EVAL_KEYS {
                rename(&mut keys, key, field);
            }
            for (field, prefix) in [
                ("accuracy_by_ability", ABILITY_PREFIX),
                ("accuracy_by_source", SOURCE_PREFIX),
            ] {
                let names: Vec<String> = keys
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned()
                    .collect();
                let mut entries = Map::new();
                for name in names {
                    let value = keys.remove(&name).expect("listed");
                    entries.insert(name[prefix.len()..].to_string(), value);
                }
                if !entries.is_empty() {
                    out.insert(field.into(), Value::Object(entries));
                }
            }
        }
        other => return Err(format!("record kind {other:?}: expected step or eval")),
    }
    out.extend(keys);
    Ok(out)
}

/// The numeric figures of a namespaced record as TensorBoard scalars (every key but `kind`
/// and `step`): a figure the step did not measure ([`OPTIONAL_KEYS`] at `null`) is left out,
/// any other `null` (JSON's NaN) is shown as NaN.
pub fn scalars(keys: &Map<String, Value>) -> Vec<(String, f64)> {
    keys.iter()
        .filter(|(key, _)| !PLAIN.contains(&key.as_str()))
        .filter_map(|(key, value)| match value {
            Value::Null if OPTIONAL_KEYS.contains(&key.as_str()) => None,
            Value::Null => Some((key.clone(), f64::NAN)),
            other => other.as_f64().map(|v| (key.clone(), v)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_key_is_namespaced_and_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for (_, key) in STEP_KEYS.iter().chain(EVAL_KEYS) {
            assert!(key.contains('/'), "{key}");
            assert!(seen.insert(*key), "{key} twice");
        }
        for key in [OLDEST_VERSION, NEWEST_VERSION] {
            assert!(seen.insert(key), "{key} twice");
        }
        for (_, key) in STEP_KEYS.iter().chain(EVAL_KEYS) {
            assert!(!key.starts_with(ABILITY_PREFIX) && !key.starts_with(SOURCE_PREFIX));
        }
    }

    #[test]
    fn an_eval_record_round_trips_by_hand() {
        let fields = json!({
            "kind": "eval", "step": 4, "accuracy": 0.5, "greedy_accuracy": null,
            "problems": 8, "seconds": 1.5, "wall_seconds": 30.0,
            "accuracy_by_ability": {"math": 0.75, "code": 0.25},
            "accuracy_by_source": {"numina_olympiads": 0.5}
        });
        let keys = namespaced(fields.as_object().unwrap().clone()).unwrap();
        assert_eq!(
            Value::Object(keys.clone()),
            json!({
                "kind": "eval", "step": 4, "val/accuracy": 0.5, "val/greedy_accuracy": null,
                "val/problems": 8, "timing_s/eval": 1.5, "timing_s/eval_wall": 30.0,
                "val/accuracy/math": 0.75, "val/accuracy/code": 0.25,
                "val/test_score/numina_olympiads": 0.5
            })
        );
        assert_eq!(Value::Object(structured(keys.clone()).unwrap()), fields);
        let mut tb = scalars(&keys);
        tb.sort_by(|a, b| a.0.cmp(&b.0));
        // greedy_accuracy was not measured: no scalar
        assert_eq!(tb.len(), 7, "{tb:?}");
        assert!(tb.contains(&("val/test_score/numina_olympiads".into(), 0.5)));
    }

    #[test]
    fn a_nan_figure_stays_nan_and_an_unmeasured_one_is_left_out() {
        let keys = json!({"kind": "step", "step": 2, "actor/pg_loss": null,
                          "actor/sampler_logprob_gap": null, "critic/score/mean": 0.5});
        let tb = scalars(keys.as_object().unwrap());
        assert_eq!(tb.len(), 2, "{tb:?}");
        assert!(tb.iter().any(|(k, v)| k == "actor/pg_loss" && v.is_nan()));
        assert!(tb.contains(&("critic/score/mean".into(), 0.5)));
    }

    #[test]
    fn an_unknown_field_is_refused() {
        let fields = json!({"kind": "step", "step": 1, "surprise": 2.0});
        let err = namespaced(fields.as_object().unwrap().clone()).unwrap_err();
        assert!(err.contains("surprise"), "{err}");
        let fields = json!({"step": 1});
        assert!(namespaced(fields.as_object().unwrap().clone()).is_err());
    }
}
