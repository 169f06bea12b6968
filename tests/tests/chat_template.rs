//! Chat templates rendered by minijinja equal transformers' `apply_chat_template` (Jinja2),
//! and our token ids equal transformers' for the same text.
use std::path::Path;

use prime_model::{ChatMessage, Tokenizer};
use prime_tests::*;
use serde_json::{json, Value};

/// A template that leans on what Jinja2 and minijinja could disagree on: `trim_blocks` and
/// `lstrip_blocks` around indented block tags, `{%-` whitespace control, loop variables,
/// Python string methods, `tojson` and a default system message.
const TRICKY_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'You are a careful solver.' %}
    {%- set rest = messages %}
{%- endif %}
<|im_start|>system
{{ system }}<|im_end|>
{% for message in rest %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unexpected role ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'].strip() }}{% if loop.last and message['role'] == 'user' %} {{ {'turn': loop.index, 'upper': message['role'].upper()} | tojson }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"#;

fn conversations() -> Vec<(Vec<Value>, bool)> {
    let user = json!({"role": "user", "content": "Tom has 3 apples and buys 4 more.\n\nPresent the answer in LaTex format: \\boxed{Your answer}"});
    let system = json!({"role": "system", "content": "  Think step by step.  "});
    let assistant = json!({"role": "assistant", "content": "3+4=7\n\\boxed{7}"});
    vec![
        (vec![user.clone()], true),
        (vec![user.clone()], false),
        (vec![system.clone(), user.clone()], true),
        (
            vec![
                system,
                user.clone(),
                assistant,
                json!({"role": "user", "content": "And twice that? \"quoted\" <tag> & é"}),
            ],
            true,
        ),
    ]
}

fn check_tokenizer_dir(dir: &Path) {
    let tokenizer = Tokenizer::from_dir(dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (input, output) = (tmp.path().join("in.jsonl"), tmp.path().join("out.jsonl"));
    let cases = conversations();
    let rows: Vec<Value> = cases
        .iter()
        .map(|(m, g)| json!({"messages": m, "add_generation_prompt": g}))
        .collect();
    write_jsonl(&input, &rows);
    qwen2_ref(&[
        "chat",
        "--tokenizer",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    for ((messages, generation_prompt), reference) in cases.iter().zip(read_jsonl(&output)) {
        let messages: Vec<ChatMessage> = serde_json::from_value(json!(messages)).unwrap();
        let text = tokenizer
            .apply_chat_template(&messages, *generation_prompt)
            .unwrap();
        assert_eq!(
            text,
            reference["text"].as_str().unwrap(),
            "rendering differs for {messages:?}"
        );
        assert_eq!(
            tokenizer.encode(&text).unwrap(),
            i64s(&reference["ids"]),
            "ids differ"
        );
    }
}

#[test]
fn chat_templates_match_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tok");
    qwen2_ref(&["make-tokenizer", "--out", dir.to_str().unwrap()]);
    // chat_template.jinja takes precedence over tokenizer_config.json, in both loaders.
    check_tokenizer_dir(&dir);
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let config_path = dir.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(TRICKY_TEMPLATE);
    std::fs::write(&config_path, config.to_string()).unwrap();
    check_tokenizer_dir(&dir);
}

#[test]
fn world_tokenizer_matches_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = prime_world::WorldConfig::default();
    config.sft.size = 300;
    config.rl.size = 100;
    config.heldout.size = 50;
    let world = prime_world::build_world(&config, tmp.path()).unwrap();
    check_tokenizer_dir(&world.tokenizer_dir);
}

/// Ids past the tokenizer's vocabulary (the padding rows of a larger embedding, which a
/// sampler can draw) decode to nothing, as in transformers.
#[test]
fn ids_past_the_tokenizer_decode_like_transformers() {
    init_threads();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = prime_world::WorldConfig::default();
    config.sft.size = 100;
    config.rl.size = 10;
    config.heldout.size = 10;
    let world = prime_world::build_world(&config, tmp.path()).unwrap();
    let tokenizer = Tokenizer::from_dir(&world.tokenizer_dir).unwrap();
    let size = tokenizer.vocab_size() as i64;
    let mut ids = tokenizer.encode("Tom has 12 apples.<|im_end|>").unwrap();
    ids.insert(2, size);
    ids.insert(4, 152_063);
    ids.push(size + 7);
    let (input, output) = (tmp.path().join("in.jsonl"), tmp.path().join("out.jsonl"));
    write_jsonl(&input, &[json!({ "ids": ids })]);
    qwen2_ref(&[
        "encode",
        "--tokenizer",
        world.tokenizer_dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let reference = &read_jsonl(&output)[0];
    let ours = tokenizer.decode(&ids, false).unwrap();
    assert_eq!(ours, reference["decoded"].as_str().unwrap());
    assert_eq!(ours, "Tom has 12 apples.<|im_end|>");
    assert!(tokenizer.decode(&[-1], false).is_err());
}
