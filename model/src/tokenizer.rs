//! Tokenizer (`tokenizer.json` through the tokenizers crate) and chat template
//! (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it with Jinja2.
use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{read_json, ModelError, Result};
use crate::piece_encoder::PieceEncoder;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A special token in `tokenizer_config.json`: a plain string or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn text(&self) -> &str {
        match self {
            SpecialToken::Text(t) | SpecialToken::Added { content: t } => t,
        }
    }
}

/// The parts of `tokenizer_config.json` that rendering needs.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
    #[serde(default)]
    pad_token: Option<SpecialToken>,
}

/// The name the chat template is compiled under in [`Tokenizer`]'s environment.
const CHAT_TEMPLATE: &str = "chat_template";

/// A tokenizer with its special tokens and chat template. The template is compiled once, at
/// load; `Tokenizer` is `Sync`, so threads may encode with one instance.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The faster path to the same ids, for Qwen2's layout of `tokenizer.json`.
    pieces: Option<PieceEncoder>,
    /// The environment holding the compiled chat template; `Err` holds why there is none
    /// usable (absent, or it does not compile), reported when a chat is rendered.
    chat_template: std::result::Result<Environment<'static>, String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and
    /// `chat_template.jinja` (which wins over the config's template, as in transformers 5).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let layout: serde_json::Value = read_json(&path)?;
        let pieces = PieceEncoder::for_layout(&layout);
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.exists() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(ModelError::io(&jinja_path))?)
        } else {
            config
                .chat_template
                .as_ref()
                .map(default_template)
                .transpose()?
        };
        let text = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.text().to_string());
        Ok(Self {
            inner,
            pieces,
            chat_template: compile_template(chat_template),
            bos_token: text(&config.bos_token),
            eos_token: text(&config.eos_token),
            pad_token: text(&config.pad_token),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without special tokens added around it (special-token text inside
    /// it, such as `<|im_start|>`, still maps to its id).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let ids = match &self.pieces {
            Some(pieces) => pieces.encode(&self.inner, text),
            None => self
                .inner
                .encode(text, false)
                .map(|encoding| encoding.get_ids().to_vec()),
        }
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// [`Self::encode`] through the tokenizers crate's own pipeline, never the faster path
    /// (which must give the same ids).
    pub fn encode_with_pipeline(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// Whether [`Self::encode`] takes the faster path for this tokenizer's layout.
    pub fn has_fast_path(&self) -> bool {
        self.pieces.is_some()
    }

    /// Text of `ids`; special tokens are kept unless `skip_special_tokens`. Ids past the
    /// tokenizer's vocabulary (the padding rows of an embedding larger than the tokenizer, as
    /// Qwen2.5's 152,064 rows for 151,665 ids, which a sampler can draw) decode to nothing,
    /// as transformers' `decode` does; a negative id is an error.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let size = self.vocab_size();
        let mut known = Vec::with_capacity(ids.len());
        for &id in ids {
            let id = u32::try_from(id)
                .map_err(|_| ModelError::Input(format!("token id {id} is negative")))?;
            if (id as usize) < size {
                known.push(id);
            }
        }
        self.inner
            .decode(&known, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// Renders the chat template as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self
            .chat_template
            .as_ref()
            .map_err(|reason| ModelError::ChatTemplate(reason.clone()))?;
        let tmpl = env
            .get_template(CHAT_TEMPLATE)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            pad_token => self.pad_token,
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }

    /// Ok when a chat template was found and compiles; else why not (the error every
    /// [`Self::apply_chat_template`] would return).
    pub fn check_chat_template(&self) -> Result<()> {
        match &self.chat_template {
            Ok(_) => Ok(()),
            Err(reason) => Err(ModelError::ChatTemplate(reason.clone())),
        }
    }

    /// Token ids of the rendered chat template, ready to prompt the model.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<i64>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?)
    }
}

/// The environment with `template` compiled under [`CHAT_TEMPLATE`], or why there is none.
fn compile_template(template: Option<String>) -> std::result::Result<Environment<'static>, String> {
    let template = template.ok_or_else(|| "the tokenizer has no chat template".to_string())?;
    let mut env = template_environment();
    env.add_template_owned(CHAT_TEMPLATE, template)
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// `chat_template` may be a string or a list of named templates; transformers uses "default".
fn default_template(value: &serde_json::Value) -> Result<String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string)
            .ok_or_else(|| ModelError::ChatTemplate("no template named \"default\"".into())),
        _ => Err(ModelError::ChatTemplate(
            "chat_template must be a string or a list".into(),
        )),
    }
}

/// A Jinja environment configured like transformers' (`trim_blocks`, `lstrip_blocks`,
/// Python string methods, `raise_exception`, `tojson` as Python's `json.dumps`).
fn template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", python_json);
    env
}

/// `json.dumps(value, ensure_ascii=False)`: `", "` and `": "` separators, no HTML escaping.
fn python_json(value: Value) -> std::result::Result<Value, minijinja::Error> {
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}
