//! Qwen2-family causal language model on tch, used by the actor, the learner and the
//! prm-server: Hugging Face config/safetensors/tokenizer I/O, chat templates, batched KV-cache
//! sampling, per-token log-probs, and weights on the wire ([`transfer`]).
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod kv_cache;
pub mod logprobs;
pub mod memory;
mod piece_encoder;
pub mod qwen2;
pub mod tokenizer;
pub mod training;
pub mod transfer;
pub mod weights;

pub use checkpoint::{CausalLm, DEFAULT_MAX_SHARD_BYTES};
pub use config::{GenerationConfig, Qwen2Config};
pub use device::{check_device, default_kind, parse_device, parse_kind};
pub use error::{torch_op, ModelError, Result};
pub use generate::{
    generate, generate_batched, generate_within, FinishReason, Generation, SamplingParams,
};
pub use kv_cache::{kv_bytes_per_token, KvBudget};
pub use logprobs::{check_sequence, sequence_logprobs, token_logprobs, PaddedBatch};
pub use qwen2::Qwen2;
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::{
    encode_tensors, encode_var_store, EncodedWeights, TensorEntry, WeightAssembler, WeightChunk,
    WeightManifest, DEFAULT_CHUNK_BYTES,
};
