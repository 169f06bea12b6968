//! `Tokenizer::encode`'s faster path (added tokens cut out, Qwen2's regex split, cached words)
//! gives the ids of the tokenizers crate's own pipeline: on chat-rendered stand-in prompts,
//! on arbitrary text with added tokens anywhere in it, under an NFC normalizer, and it stays
//! out of the way for layouts it does not cover.
use std::path::Path;

use prime_model::{ChatMessage, Tokenizer};
use prime_world::standin::{standin_row, StandinSplit};
use prime_world::tokenizer::{save_tokenizer, split_special_tokens, train_tokenizer};
use proptest::prelude::*;

/// A world-style tokenizer trained on stand-in prompts, saved in `dir`.
fn trained_tokenizer(dir: &Path) -> Vec<String> {
    let texts: Vec<String> = (0..400)
        .map(|i| {
            let row = standin_row(1, StandinSplit::Validation, i).row;
            prime_world::tokenizer::render_chatml(&row.prompt, true)
        })
        .collect();
    let tokenizer =
        train_tokenizer(texts.iter().flat_map(|t| split_special_tokens(t)), 1_200).unwrap();
    save_tokenizer(&tokenizer, dir).unwrap();
    texts
}

fn tokenizer_dir() -> &'static (tempfile::TempDir, Vec<String>) {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, Vec<String>)> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let texts = trained_tokenizer(dir.path());
        (dir, texts)
    })
}

fn assert_same(tokenizer: &Tokenizer, text: &str) {
    // Twice: the second time the words come from the cache.
    for _ in 0..2 {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            tokenizer.encode_with_pipeline(text).unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn prompts_encode_to_the_pipelines_ids() {
    let (dir, texts) = tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(tokenizer.has_fast_path());
    for text in texts {
        assert_same(&tokenizer, text);
    }
    // Rows the tokenizer never saw, through the chat template as a run renders them.
    for i in 0..200 {
        let row = standin_row(2, StandinSplit::Train, i * 17).row;
        let messages: Vec<ChatMessage> = row
            .prompt
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let ids = tokenizer.encode_chat(&messages, true).unwrap();
        let text = tokenizer.apply_chat_template(&messages, true).unwrap();
        assert_eq!(ids, tokenizer.encode_with_pipeline(&text).unwrap());
    }
    for text in [
        "",
        "<|im_start|>",
        "<|im_start|><|im_end|><|endoftext|>",
        "<|im_start|user",
        "a<|im_end|>b <|im_end|>\n\n<|im_start|> x",
        "<<|im_start|>>",
        "  \t\r\n  leading and trailing  \n\n\n",
        "digits 1234567890 and 3.14159, x^2 + y_1 = $\\frac{1}{2}$",
        "unicode: Ünïcödé 😀 日本語 e\u{301} \u{0}\u{1f}\u{7f}\u{ad}",
        "```python\ndef f(x):\n    return x * 2\n```\n",
    ] {
        assert_same(&tokenizer, text);
    }
}

/// Text made of words, spaces, digits, symbols, non-ASCII and added tokens.
fn mixed_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z]{1,12}",
        "[ \t\n\r]{1,4}",
        "[0-9]{1,6}",
        "[!-/:-@\\[-`{-~]{1,3}",
        "\\PC{1,4}",
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<|im_".to_string()),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_text_encodes_to_the_pipelines_ids(text in mixed_text()) {
        let (dir, _) = tokenizer_dir();
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        prop_assert_eq!(
            tokenizer.encode(&text).unwrap(),
            tokenizer.encode_with_pipeline(&text).unwrap()
        );
    }
}

/// The trained tokenizer's `tokenizer.json` with `edit` applied, in a new directory.
fn edited(edit: impl Fn(&mut serde_json::Value)) -> (tempfile::TempDir, Tokenizer) {
    let (dir, _) = tokenizer_dir();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap())
            .unwrap();
    edit(&mut json);
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(
        dir.path().join("tokenizer_config.json"),
        out.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(out.path()).unwrap();
    (out, tokenizer)
}

#[test]
fn an_nfc_normalizer_is_applied_to_text_it_could_change() {
    // Qwen2's own tokenizer.json normalizes with NFC.
    let (_dir, tokenizer) = edited(|json| json["normalizer"] = serde_json::json!({"type": "NFC"}));
    assert!(tokenizer.has_fast_path());
    for text in [
        "cafe\u{301} <|im_end|> cafe",
        "A\u{30a}ngstro\u{308}m and plain ascii",
        "\u{212b} \u{2126} 한\u{1100}\u{1161}",
    ] {
        assert_same(&tokenizer, text);
    }
    // NFC changes the ids of the decomposed text: the fast path must not skip it.
    assert_eq!(
        tokenizer.encode("cafe\u{301}").unwrap(),
        tokenizer.encode("caf\u{e9}").unwrap()
    );
}

#[test]
fn other_layouts_go_through_the_pipeline() {
    let lowercase = |json: &mut serde_json::Value| {
        json["normalizer"] = serde_json::json!({"type": "Lowercase"})
    };
    let stripped_token =
        |json: &mut serde_json::Value| json["added_tokens"][1]["lstrip"] = true.into();
    let dropout = |json: &mut serde_json::Value| json["model"]["dropout"] = 0.1.into();
    for edit in [
        &lowercase as &dyn Fn(&mut serde_json::Value),
        &stripped_token,
        &dropout,
    ] {
        let (_dir, tokenizer) = edited(edit);
        assert!(!tokenizer.has_fast_path());
    }
    let (_dir, tokenizer) = edited(lowercase);
    assert_eq!(
        tokenizer.encode("ABC").unwrap(),
        tokenizer.encode("abc").unwrap()
    );
}
