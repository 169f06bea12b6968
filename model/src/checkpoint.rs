//! Hugging Face model directories: `config.json`, `generation_config.json`, and weights in
//! `model.safetensors` or shards listed by `model.safetensors.index.json`.
//!
//! Loading copies each tensor by name into the VarStore (shapes checked, dtype converted);
//! saving writes the same layout with HF tensor names, so transformers and vLLM load our
//! checkpoints unchanged.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::config::{GenerationConfig, Qwen2Config};
use crate::error::{read_json, ModelError, Result};
use crate::qwen2::{Init, Qwen2};

/// File names of a model directory.
pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Tokenizer files copied along with a checkpoint when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];
/// transformers' default shard limit for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// `model.safetensors.index.json`.
#[derive(Debug, Serialize, Deserialize)]
struct WeightIndex {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

/// A causal LM with the variables that own its weights.
#[derive(Debug)]
pub struct CausalLm {
    pub vs: nn::VarStore,
    pub model: Qwen2,
    pub config: Qwen2Config,
    pub generation_config: GenerationConfig,
}

impl CausalLm {
    /// A freshly initialised model (normal(0, 0.02) matrices, as transformers initialises).
    /// Variables are stored in `param_kind`, activations computed in `compute_kind`.
    pub fn random(
        config: &Qwen2Config,
        device: Device,
        param_kind: Kind,
        compute_kind: Kind,
    ) -> Result<Self> {
        config.validate().map_err(ModelError::Config)?;
        let mut vs = nn::VarStore::new(device);
        let model = Qwen2::new(&vs.root(), config, Init::Normal { std: 0.02 }, compute_kind);
        vs.set_kind(param_kind);
        Ok(Self {
            vs,
            model,
            config: config.clone(),
            generation_config: GenerationConfig::default(),
        })
    }

    /// Loads a model directory onto `device`, storing weights in `param_kind` and computing
    /// in `compute_kind`, whatever dtype the files hold.
    pub fn load(dir: &Path, device: Device, param_kind: Kind, compute_kind: Kind) -> Result<Self> {
        let config = Qwen2Config::from_file(&dir.join(CONFIG_FILE))?;
        let generation_path = dir.join(GENERATION_CONFIG_FILE);
        let generation_config = if generation_path.exists() {
            read_json(&generation_path)?
        } else {
            GenerationConfig::default()
        };
        let mut vs = nn::VarStore::new(device);
        let model = Qwen2::new(&vs.root(), &config, Init::Zeros, compute_kind);
        vs.set_kind(param_kind);
        load_weights(&vs, dir, config.tie_word_embeddings)?;
        tracing::info!(
            dir = %dir.display(),
            parameters = config.num_parameters(),
            ?device,
            ?param_kind,
            "loaded model"
        );
        Ok(Self {
            vs,
            model,
            config,
            generation_config,
        })
    }

    /// Token ids that end a response (see [`GenerationConfig::stop_ids`]).
    pub fn eos_token_ids(&self) -> Vec<i64> {
        self.generation_config.stop_ids(&self.config)
    }

    /// Saves config, generation config and weights (in `kind`, default the stored dtype) as a
    /// Hugging Face model directory; shards above `max_shard_bytes` like `save_pretrained`.
    pub fn save(&self, dir: &Path, kind: Option<Kind>, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
        let named = self.named_tensors(kind);
        let kind = named.first().map_or(Kind::Float, |(_, t)| t.kind());
        let mut config =
            serde_json::to_value(&self.config).map_err(|e| ModelError::Config(e.to_string()))?;
        config["dtype"] = serde_json::Value::from(hf_dtype_name(kind));
        if config.get("torch_dtype").is_some() {
            config["torch_dtype"] = config["dtype"].clone();
        }
        config["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        write_json(&dir.join(CONFIG_FILE), &config)?;
        write_json(&dir.join(GENERATION_CONFIG_FILE), &self.generation_config)?;
        save_weights(dir, &named, max_shard_bytes)
    }

    /// `(HF name, contiguous CPU tensor)` for every weight, sorted by name; the tied LM head
    /// is left out as transformers does.
    fn named_tensors(&self, kind: Option<Kind>) -> Vec<(String, Tensor)> {
        let _guard = tch::no_grad_guard();
        let mut named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| !(self.config.tie_word_embeddings && name == "lm_head.weight"))
            .map(|(name, t)| {
                let t = t.to_device(Device::Cpu);
                let t = kind.map_or(t.shallow_clone(), |k| t.to_kind(k));
                (name, t.contiguous())
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }
}

/// Copies the tokenizer files of `src` that exist into `dst`.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.exists() {
            std::fs::copy(&from, dst.join(name)).map_err(ModelError::io(&from))?;
        }
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(ModelError::io(path))
}

fn hf_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// The weight files of a model directory: the shards of the index, or the single file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    if index_path.exists() {
        let index: WeightIndex = read_json(&index_path)?;
        let shards: HashSet<&String> = index.weight_map.values().collect();
        let mut files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        files.sort();
        return Ok(files);
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::checkpoint(
        dir,
        format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in the model directory"),
    ))
}

/// Copies every tensor of the directory's weight files into the VarStore variable of the same
/// name. Every variable must be found with the same shape, except a tied LM head.
fn load_weights(vs: &nn::VarStore, dir: &Path, tied: bool) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut variables: HashMap<String, Tensor> = vs.variables();
    if tied {
        variables.remove("lm_head.weight");
    }
    let mut found = HashSet::new();
    for file in weight_files(dir)? {
        let handle = std::fs::File::open(&file).map_err(ModelError::io(&file))?;
        // SAFETY: the mapping is read-only and lives until the copies below have finished.
        let mmap = unsafe { memmap2::Mmap::map(&handle) }.map_err(ModelError::io(&file))?;
        let tensors = SafeTensors::deserialize(&mmap)
            .map_err(|e| ModelError::checkpoint(&file, format!("not a safetensors file: {e}")))?;
        for (name, view) in tensors.tensors() {
            let Some(var) = variables.get_mut(&name) else {
                if !(tied && name == "lm_head.weight") {
                    tracing::warn!(file = %file.display(), tensor = name, "unused tensor");
                }
                continue;
            };
            copy_into(var, &view)
                .map_err(|m| ModelError::checkpoint(&file, format!("{name}: {m}")))?;
            found.insert(name);
        }
    }
    let mut missing: Vec<&String> = variables.keys().filter(|n| !found.contains(*n)).collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(ModelError::checkpoint(
            dir,
            format!("weights missing from the checkpoint: {missing:?}"),
        ));
    }
    Ok(())
}

fn copy_into(var: &mut Tensor, view: &TensorView<'_>) -> std::result::Result<(), String> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    if shape != var.size() {
        return Err(format!(
            "shape {shape:?} in the file, the model expects {:?}",
            var.size()
        ));
    }
    let kind = kind_of(view.dtype())
        .ok_or_else(|| format!("dtype {:?} is not supported (F32, BF16, F16)", view.dtype()))?;
    let source = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| e.to_string())?;
    var.f_copy_(&source).map_err(|e| e.to_string())
}

/// Bytes of one tensor, in the layout safetensors expects (row-major, little endian).
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn tensor_bytes(t: &Tensor) -> Result<TensorBytes> {
    let mut data = vec![0u8; tensor_byte_len(t)];
    write_tensor_bytes(t, &mut data)?;
    Ok(TensorBytes {
        dtype: dtype_of(t.kind()),
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// Size of a tensor's elements in bytes.
pub(crate) fn tensor_byte_len(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// Writes a tensor's elements into `out` (exactly [`tensor_byte_len`] long) as row-major bytes
/// in the machine's byte order, little endian on every platform libtorch supports. libtorch
/// moves the tensor to the CPU and makes it contiguous first when it has to.
pub(crate) fn write_tensor_bytes(t: &Tensor, out: &mut [u8]) -> Result<()> {
    Ok(t.f_copy_data_u8(out, t.numel())?)
}

/// Writes the tensors to `model.safetensors`, or to `model-0000i-of-0000n.safetensors` shards
/// plus an index when they exceed `max_shard_bytes`.
fn save_weights(dir: &Path, named: &[(String, Tensor)], max_shard_bytes: usize) -> Result<()> {
    let mut shards: Vec<Vec<(String, TensorBytes)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total_size = 0usize;
    for (name, tensor) in named {
        let bytes = tensor_bytes(tensor)?;
        let size = bytes.data.len();
        if shard_bytes > 0 && shard_bytes + size > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += size;
        total_size += size;
        shards
            .last_mut()
            .expect("one shard")
            .push((name.clone(), bytes));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let write = |path: &Path, shard: &[(String, TensorBytes)]| -> Result<()> {
        let views = shard.iter().map(|(n, b)| (n.as_str(), b));
        safetensors::serialize_to_file(views, metadata.clone(), path)
            .map_err(|e| ModelError::checkpoint(path, e.to_string()))
    };
    let stale = [dir.join(WEIGHTS_FILE), dir.join(WEIGHTS_INDEX_FILE)];
    for path in stale.iter().filter(|p| p.exists()) {
        std::fs::remove_file(path).map_err(ModelError::io(path))?;
    }
    if shards.len() == 1 {
        return write(&dir.join(WEIGHTS_FILE), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write(&dir.join(&file), shard)?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let mut index_metadata = serde_json::Map::new();
    index_metadata.insert("total_size".into(), total_size.into());
    let index = WeightIndex {
        metadata: index_metadata,
        weight_map,
    };
    write_json(&dir.join(WEIGHTS_INDEX_FILE), &index)
}
