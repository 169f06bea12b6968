//! The project's tokenizer: byte-level BPE in the style of Qwen2, trained on the world's text.
//!
//! Like Qwen2's, the pipeline is: split with Qwen2's regex (which isolates every digit, so
//! numbers are digit sequences), map bytes to printable symbols (ByteLevel), BPE. There is no
//! normalizer, so `decode(encode(x)) == x` for every string, not only for NFC text. All 256
//! byte symbols are in the vocabulary, so any text encodes without an unknown token. The
//! special tokens take ids 0, 1, 2 and are never split; encoding adds no BOS or EOS.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer, TokenizerBuilder, TokenizerImpl,
};

use crate::{ChatMessage, WorldError};

/// End of a document; also the padding token, as in Qwen2.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// Opens a chat message.
pub const IM_START: &str = "<|im_start|>";
/// Closes a chat message; the EOS token of chat generation.
pub const IM_END: &str = "<|im_end|>";
/// The special tokens, in id order (0, 1, 2).
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// Qwen2's pre-tokenizer regex (from its tokenizer.json): `\p{N}` alone puts each digit in a
/// piece of its own.
pub const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ChatML as Qwen2.5 writes it, without Qwen's default system prompt or tool calls:
/// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then `<|im_start|>assistant\n`
/// when `add_generation_prompt`. [`render_chatml`] produces the same text.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Renders messages the way [`CHAT_TEMPLATE`] does (used to train and measure the tokenizer
/// without a template engine; a test checks it against transformers' `apply_chat_template`).
pub fn render_chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut text = String::new();
    for message in messages {
        text.push_str(IM_START);
        text.push_str(&message.role);
        text.push('\n');
        text.push_str(&message.content);
        text.push_str(IM_END);
        text.push('\n');
    }
    if add_generation_prompt {
        text.push_str(IM_START);
        text.push_str("assistant\n");
    }
    text
}

/// The pieces of `text` between special tokens: what the BPE model actually sees.
pub fn split_special_tokens(text: &str) -> Vec<&str> {
    let mut pieces = vec![text];
    for special in SPECIAL_TOKENS {
        pieces = pieces
            .into_iter()
            .flat_map(|piece| piece.split(special))
            .filter(|piece| !piece.is_empty())
            .collect();
    }
    pieces
}

fn tokenizer_error(e: impl std::fmt::Display) -> WorldError {
    WorldError::Tokenizer(e.to_string())
}

/// Trains the byte-level BPE on `texts` (raw text without special tokens, e.g. the pieces
/// from [`split_special_tokens`]) up to `vocab_size` entries, special tokens and the 256 byte
/// symbols included. Merges need a pair count of at least 2; ties are broken by the trainer's
/// fixed pair order, so the result depends only on the texts.
pub fn train_tokenizer<I, S>(texts: I, vocab_size: usize) -> Result<Tokenizer, WorldError>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(tokenizer_error)?;
    let byte_level = ByteLevel::new(false, false, false);
    let mut tokenizer: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(
            Sequence::new(vec![split.into(), byte_level.into()]).into(),
        ))
        .with_post_processor(Some(byte_level.into()))
        .with_decoder(Some(ByteLevelDecoder::new(false, false, false).into()))
        .build()
        .map_err(tokenizer_error)?;
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train(&mut trainer, texts)
        .map_err(tokenizer_error)?;
    let tokenizer = Tokenizer::from(tokenizer);
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(WorldError::Tokenizer(format!(
                "special token {token} did not get id {id}"
            )));
        }
    }
    tracing::info!(
        vocab_size = tokenizer.get_vocab_size(true),
        "trained byte-level BPE tokenizer"
    );
    Ok(tokenizer)
}

/// Token ids of `text`, special tokens recognised, nothing added.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, WorldError> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(tokenizer_error)?
        .get_ids()
        .to_vec())
}

/// Checks that `text` survives encode then decode (special tokens kept) unchanged.
pub fn check_round_trip(tokenizer: &Tokenizer, text: &str) -> Result<(), WorldError> {
    let ids = encode(tokenizer, text)?;
    let decoded = tokenizer.decode(&ids, false).map_err(tokenizer_error)?;
    if decoded != text {
        return Err(WorldError::Tokenizer(format!(
            "decode(encode(x)) != x for {text:?}: got {decoded:?}"
        )));
    }
    Ok(())
}

/// The `tokenizer_config.json` that makes `transformers.AutoTokenizer` load the tokenizer
/// with ChatML, `<|im_end|>` as EOS, `<|endoftext|>` as padding and no BOS, like Qwen2.5.
pub fn tokenizer_config(tokenizer: &Tokenizer) -> serde_json::Value {
    let mut added: Vec<_> = tokenizer.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let added_tokens_decoder: serde_json::Map<String, serde_json::Value> = added
        .into_iter()
        .map(|(id, token)| {
            (
                id.to_string(),
                serde_json::json!({
                    "content": token.content,
                    "lstrip": token.lstrip,
                    "normalized": token.normalized,
                    "rstrip": token.rstrip,
                    "single_word": token.single_word,
                    "special": token.special,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": null,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": IM_END,
        "errors": "replace",
        "pad_token": ENDOFTEXT,
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null,
    })
}

/// Where [`save_tokenizer`] put the files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: PathBuf,
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if missing).
pub fn save_tokenizer(tokenizer: &Tokenizer, dir: &Path) -> Result<TokenizerFiles, WorldError> {
    std::fs::create_dir_all(dir).map_err(|e| WorldError::io(dir, e))?;
    let files = TokenizerFiles {
        tokenizer_json: dir.join("tokenizer.json"),
        tokenizer_config: dir.join("tokenizer_config.json"),
    };
    let json = tokenizer.to_string(true).map_err(tokenizer_error)?;
    std::fs::write(&files.tokenizer_json, json)
        .map_err(|e| WorldError::io(&files.tokenizer_json, e))?;
    let config = serde_json::to_string_pretty(&tokenizer_config(tokenizer))
        .map_err(|e| WorldError::io(&files.tokenizer_config, e.into()))?;
    std::fs::write(&files.tokenizer_config, config)
        .map_err(|e| WorldError::io(&files.tokenizer_config, e))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        (0..200)
            .map(|i| format!("user\nMia has {i} apples. How many apples now?\nassistant\n{i} + 3 = {}\n\\boxed{{{}}}", i + 3, i + 3))
            .collect()
    }

    #[test]
    fn digits_are_single_tokens_and_text_round_trips() {
        let tokenizer = train_tokenizer(corpus().into_iter(), 300).unwrap();
        let vocab = tokenizer.get_vocab_size(true);
        assert!((260..=300).contains(&vocab), "{vocab}");
        let text = "<|im_start|>user\nMia has 123 apples.<|im_end|>\n<|im_start|>assistant\n";
        let ids = encode(&tokenizer, text).unwrap();
        assert_eq!(ids[0], 1);
        let tokens: Vec<String> = ids
            .iter()
            .map(|&id| tokenizer.id_to_token(id).unwrap())
            .collect();
        for digit in ["1", "2", "3"] {
            assert!(tokens.contains(&digit.to_string()), "{tokens:?}");
        }
        check_round_trip(&tokenizer, text).unwrap();
        check_round_trip(&tokenizer, "unseen: Ünïcödé 😀 \t\r\n  tabs").unwrap();
    }

    #[test]
    fn split_special_tokens_drops_specials_and_empty_pieces() {
        let text = render_chatml(&[ChatMessage::new("user", "hi")], true);
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            split_special_tokens(&text),
            vec!["user\nhi", "\n", "assistant\n"]
        );
    }

    #[test]
    fn chat_template_renders_like_render_chatml_in_minijinja() {
        let env = minijinja::Environment::new();
        let template = env.template_from_str(CHAT_TEMPLATE).unwrap();
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new(
                "user",
                "Q?\n\nPresent the answer in LaTex format: \\boxed{Your answer}",
            ),
            ChatMessage::new("assistant", "1+1=2\n\\boxed{2}"),
        ];
        for add_generation_prompt in [false, true] {
            let rendered = template
                .render(minijinja::context! { messages => &messages, add_generation_prompt })
                .unwrap();
            assert_eq!(rendered, render_chatml(&messages, add_generation_prompt));
        }
    }
}
