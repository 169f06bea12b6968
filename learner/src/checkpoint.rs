//! Training checkpoints that a run resumes from exactly.
//!
//! `root/step-000042/` holds the policy and the PRM as Hugging Face model directories
//! (`policy/`, `prm/`: transformers and vLLM load them as they are), both AdamW states in
//! safetensors and `trainer_state.json` (step, policy version, data cursor, RNG position, the
//! filter's surplus prompts). `root/latest` names the checkpoint to resume from.
//!
//! Crash safety: a checkpoint is written under `root/.tmp-*`, fsynced and renamed into place,
//! and `latest` is replaced the same way, so a crash at any point leaves the previous checkpoint
//! complete and named. Re-saving a step that exists moves the old directory to
//! `root/.old-step-*` for the instant between two renames; [`latest`] and the next [`save`]
//! know how to finish that swap. One process writes a root at a time.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use prime_model::checkpoint::{
    copy_tokenizer_files, CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE,
};
use prime_model::{CausalLm, DEFAULT_MAX_SHARD_BYTES};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{LearnerError, Result};
use crate::optim::AdamW;

/// The file in the checkpoint root that names the checkpoint to resume from.
pub const LATEST_FILE: &str = "latest";
/// The policy's Hugging Face model directory inside a checkpoint.
pub const POLICY_DIR: &str = "policy";
/// The implicit PRM's Hugging Face model directory inside a checkpoint.
pub const PRM_DIR: &str = "prm";
/// The policy optimizer's state inside a checkpoint.
pub const POLICY_OPTIMIZER_FILE: &str = "policy_optimizer.safetensors";
/// The PRM optimizer's state inside a checkpoint.
pub const PRM_OPTIMIZER_FILE: &str = "prm_optimizer.safetensors";
/// The [`TrainerState`] inside a checkpoint, written last.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// The tensor of an optimizer file that holds the AdamW step count (int64, 0-dim), the way
/// `torch.optim` keeps `step` as a tensor beside the moments.
pub const OPTIMIZER_STEP_TENSOR: &str = "step";

const STEP_PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";
const OLD_PREFIX: &str = ".old-";

/// Everything besides tensors that a resumed run needs, saved as `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Learner steps completed; the checkpoint directory is named after it.
    pub step: u64,
    /// Version of the policy weights in this checkpoint, as actors see it.
    pub policy_version: u64,
    /// Position of the next prompt in the current pass over the data.
    pub data_cursor: u64,
    /// Completed passes over the data (the shuffle of each pass derives from it).
    pub data_epoch: u64,
    /// Position of the learner's random number generator.
    pub rng: RngState,
    /// Prompts the filter accepted beyond the batch and queued for later, in queue order.
    pub surplus_prompts: Vec<u64>,
    /// Anything else the trainer wants back on resume (e.g. counters for metrics).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The exact position of a [`ChaCha8Rng`]: key, stream and word position. Restoring it gives
/// the very numbers the saved generator would have produced next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, as 64 hex digits.
    #[serde(with = "hex_seed")]
    pub seed: [u8; 32],
    /// The ChaCha stream (nonce).
    pub stream: u64,
    /// 32-bit words consumed so far. Up to 2^68, so a decimal string: JSON readers that hold
    /// numbers as doubles would round it.
    #[serde(with = "decimal_u128")]
    pub word_pos: u128,
}

impl RngState {
    /// The position of `rng`, including words it has generated but not handed out yet.
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// A generator at this position.
    pub fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

mod hex_seed {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(seed: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let hex = String::deserialize(d)?;
        let bad = || D::Error::custom(format!("seed {hex:?} is not 64 hex digits"));
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (byte, pair) in seed.iter_mut().zip(hex.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(seed)
    }
}

mod decimal_u128 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("word_pos {text:?}: {e}")))
    }
}

/// What one checkpoint holds.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointParts<'a> {
    /// The policy, saved in its parameter dtype.
    pub policy: &'a CausalLm,
    /// The implicit PRM, saved in its parameter dtype.
    pub prm: &'a CausalLm,
    /// The policy's optimizer.
    pub policy_optimizer: &'a AdamW,
    /// The PRM's optimizer.
    pub prm_optimizer: &'a AdamW,
    /// Tokenizer files to copy into both model directories, so each loads on its own.
    pub tokenizer_dir: Option<&'a Path>,
    /// Step, version, data position, RNG and queue.
    pub state: &'a TrainerState,
}

/// Where the supervised warm-up of a run dir leaves its checkpoint.
pub fn sft_checkpoint(run_dir: &Path) -> PathBuf {
    run_dir.join("sft").join("checkpoint")
}

/// The directory name of the checkpoint after `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:06}")
}

/// The step of a `step-N` directory name; `None` for any other name.
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes the checkpoint of `parts.state.step` as `root/step-{step:06}/` and points
/// `root/latest` at it; returns its directory. With `keep > 0`, checkpoints of earlier steps
/// beyond the newest `keep` (this one included) are deleted. Checkpoints of later steps, left by
/// a run that was resumed from an earlier one, are kept and reported.
///
/// A failed save (a full disk, a read-only volume) removes what it wrote and returns
/// [`LearnerError::Checkpoint`] naming the step, the file and the OS error, and the checkpoint
/// a resume would start from after the failure; the checkpoints already there are left as
/// they were.
pub fn save(root: &Path, parts: &CheckpointParts<'_>, keep: usize) -> Result<PathBuf> {
    let step = parts.state.step;
    save_unreported(root, parts, keep).map_err(|e| {
        // What a resume would start from now, so the reader knows what the failure cost.
        let latest = match latest(root) {
            Ok(Some(dir)) => format!("the latest checkpoint is {}", dir.display()),
            Ok(None) => "there is no checkpoint to resume from".to_string(),
            Err(e) => format!("the latest checkpoint cannot be read: {e}"),
        };
        LearnerError::Checkpoint(format!(
            "saving step {step} under {} failed: {e}; {latest}",
            root.display()
        ))
    })
}

fn save_unreported(root: &Path, parts: &CheckpointParts<'_>, keep: usize) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(LearnerError::io(root))?;
    recover(root)?;
    let step = parts.state.step;
    let name = step_dir_name(step);
    let tmp = root.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    if let Err(e) = write_contents(&tmp, parts).and_then(|()| sync_tree(&tmp)) {
        if let Err(cleanup) = fs::remove_dir_all(&tmp) {
            tracing::warn!(dir = %tmp.display(), "removing a failed checkpoint: {cleanup}");
        }
        return Err(e);
    }
    let dir = root.join(&name);
    if dir.exists() {
        // rename() does not replace a non-empty directory: move the old one aside first.
        let old = root.join(format!("{OLD_PREFIX}{name}"));
        rename(&dir, &old)?;
        rename(&tmp, &dir)?;
        sync_dir(root)?;
        fs::remove_dir_all(&old).map_err(LearnerError::io(&old))?;
    } else {
        rename(&tmp, &dir)?;
    }
    sync_dir(root)?;
    write_latest(root, &name)?;
    prune(root, step, keep)?;
    tracing::info!(dir = %dir.display(), step, "saved checkpoint");
    Ok(dir)
}

/// The checkpoint to resume from: the one `root/latest` names, else (no pointer, or one to a
/// missing or incomplete directory) the complete checkpoint with the highest step; `None` when
/// there is none. Only reads, so it is safe beside a running writer; leftovers of an interrupted
/// write are ignored here and removed by the next [`save`].
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    if !root.is_dir() {
        return Ok(None);
    }
    let pointer = root.join(LATEST_FILE);
    match fs::read_to_string(&pointer) {
        Ok(text) => {
            let name = text.trim();
            if let Some(dir) = parse_step(name).and_then(|step| resolve(root, step)) {
                return Ok(Some(dir));
            }
            tracing::warn!(
                pointer = %pointer.display(),
                name,
                "not a complete checkpoint; taking the newest complete one"
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LearnerError::io(&pointer)(e)),
    }
    Ok(complete_checkpoints(root)?.pop().map(|(_, dir)| dir))
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = fs::read_to_string(&path).map_err(LearnerError::io(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| LearnerError::Checkpoint(format!("{}: {e}", path.display())))
}

/// Writes the moments and step count of `optimizer` to a safetensors file at `path`: the
/// moments under [`AdamW::state`]'s names, the step as [`OPTIMIZER_STEP_TENSOR`]. Tensors are
/// copied to the host one at a time.
pub fn save_optimizer(path: &Path, optimizer: &AdamW) -> Result<()> {
    let (moments, step) = optimizer.state();
    let mut named: Vec<(String, Tensor)> = moments
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect();
    named.push((
        OPTIMIZER_STEP_TENSOR.to_string(),
        Tensor::from_slice(&[step]).squeeze(),
    ));
    Tensor::write_safetensors(&named, path)
        .map_err(|e| LearnerError::Checkpoint(format!("{}: {e}", path.display())))
}

/// Restores `optimizer` from a file written by [`save_optimizer`] onto the parameters'
/// devices. The file must hold exactly the moments of the optimizer's parameters, with their
/// shapes.
pub fn load_optimizer(path: &Path, optimizer: &mut AdamW) -> Result<()> {
    let (state, step) = read_optimizer(path, optimizer)?;
    optimizer
        .load_state(&state, step)
        .map_err(|message| optimizer_error(path, message))
}

/// Like [`load_optimizer`], but the state stays on the host (as the file is read) until the
/// first update needs it ([`AdamW::stage_state`]): a data-parallel rank that shards the
/// optimizer moves only its shard to the device.
pub fn load_optimizer_to_host(path: &Path, optimizer: &mut AdamW) -> Result<()> {
    let (state, step) = read_optimizer(path, optimizer)?;
    optimizer
        .stage_state(&state, step)
        .map_err(|message| optimizer_error(path, message))
}

fn optimizer_error(path: &Path, message: String) -> LearnerError {
    LearnerError::Checkpoint(format!("{}: {message}", path.display()))
}

/// The tensors (on the host) and step count of an optimizer file, checked to name only
/// state that `optimizer` has.
fn read_optimizer(path: &Path, optimizer: &AdamW) -> Result<(BTreeMap<String, Tensor>, i64)> {
    let bad = |message: String| optimizer_error(path, message);
    let mut state: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .collect();
    let step = state
        .remove(OPTIMIZER_STEP_TENSOR)
        .ok_or_else(|| bad(format!("no {OPTIMIZER_STEP_TENSOR} tensor")))?;
    if step.kind() != Kind::Int64 || step.numel() != 1 {
        return Err(bad(format!(
            "{OPTIMIZER_STEP_TENSOR} is {:?} {:?}, expected one int64",
            step.kind(),
            step.size()
        )));
    }
    let expected: BTreeSet<String> = optimizer.state_names().into_iter().collect();
    let unexpected: Vec<&String> = state.keys().filter(|k| !expected.contains(*k)).collect();
    if !unexpected.is_empty() {
        return Err(bad(format!(
            "tensors for parameters the optimizer lacks: {unexpected:?}"
        )));
    }
    Ok((state, step.int64_value(&[])))
}

/// Writes every part under `tmp`, the trainer state last.
fn write_contents(tmp: &Path, parts: &CheckpointParts<'_>) -> Result<()> {
    fs::create_dir(tmp).map_err(LearnerError::io(tmp))?;
    for (sub, lm) in [(POLICY_DIR, parts.policy), (PRM_DIR, parts.prm)] {
        let dir = tmp.join(sub);
        lm.save(&dir, None, DEFAULT_MAX_SHARD_BYTES)?;
        if let Some(tokenizer_dir) = parts.tokenizer_dir {
            copy_tokenizer_files(tokenizer_dir, &dir)?;
        }
    }
    save_optimizer(&tmp.join(POLICY_OPTIMIZER_FILE), parts.policy_optimizer)?;
    save_optimizer(&tmp.join(PRM_OPTIMIZER_FILE), parts.prm_optimizer)?;
    let path = tmp.join(TRAINER_STATE_FILE);
    let text = serde_json::to_string_pretty(parts.state).expect("trainer state serialises");
    fs::write(&path, text + "\n").map_err(LearnerError::io(&path))
}

/// Whether `dir` holds a whole checkpoint of `step`. Renaming makes a checkpoint appear whole,
/// so this only guards against directories copied or edited by hand.
fn is_complete(dir: &Path, step: u64) -> bool {
    let model_ok = |sub: &str| {
        let model = dir.join(sub);
        model.join(CONFIG_FILE).is_file()
            && (model.join(WEIGHTS_FILE).is_file() || model.join(WEIGHTS_INDEX_FILE).is_file())
    };
    model_ok(POLICY_DIR)
        && model_ok(PRM_DIR)
        && dir.join(POLICY_OPTIMIZER_FILE).is_file()
        && dir.join(PRM_OPTIMIZER_FILE).is_file()
        && load_state(dir).is_ok_and(|state| state.step == step)
}

/// The complete checkpoint of `step`: `step-N`, or `.old-step-N` when a re-save of that step
/// was interrupted between its two renames.
fn resolve(root: &Path, step: u64) -> Option<PathBuf> {
    let name = step_dir_name(step);
    [root.join(&name), root.join(format!("{OLD_PREFIX}{name}"))]
        .into_iter()
        .find(|dir| is_complete(dir, step))
}

/// Complete checkpoints under `root` by ascending step.
fn complete_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut steps = BTreeSet::new();
    for entry in fs::read_dir(root).map_err(LearnerError::io(root))? {
        let entry = entry.map_err(LearnerError::io(root))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(step) = parse_step(name.strip_prefix(OLD_PREFIX).unwrap_or(&name)) {
            steps.insert(step);
        }
    }
    Ok(steps
        .into_iter()
        .filter_map(|step| resolve(root, step).map(|dir| (step, dir)))
        .collect())
}

/// Cleans up after an interrupted save: removes `.tmp-*` leftovers and finishes an interrupted
/// re-save (the old copy goes if the new one is in place, else it is moved back).
fn recover(root: &Path) -> Result<()> {
    for entry in fs::read_dir(root).map_err(LearnerError::io(root))? {
        let entry = entry.map_err(LearnerError::io(root))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) {
            tracing::warn!(path = %path.display(), "removing the leftover of an interrupted save");
            remove_path(&path)?;
        } else if let Some(step) = name.strip_prefix(OLD_PREFIX).and_then(parse_step) {
            let dir = root.join(step_dir_name(step));
            if is_complete(&dir, step) {
                remove_path(&path)?;
            } else {
                tracing::warn!(dir = %dir.display(), "restoring a checkpoint whose re-save was interrupted");
                if dir.exists() {
                    remove_path(&dir)?;
                }
                rename(&path, &dir)?;
            }
        }
    }
    sync_dir(root)
}

/// Deletes checkpoints of steps before `step` beyond the newest `keep` (counting `step`'s own).
fn prune(root: &Path, step: u64, keep: usize) -> Result<()> {
    let checkpoints = complete_checkpoints(root)?;
    let later: Vec<u64> = checkpoints
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| *s > step)
        .collect();
    if !later.is_empty() {
        tracing::warn!(
            step,
            ?later,
            "checkpoints of later steps from an earlier run are left in place"
        );
    }
    if keep == 0 {
        return Ok(());
    }
    let earlier: Vec<&PathBuf> = checkpoints
        .iter()
        .filter(|(s, _)| *s < step)
        .map(|(_, dir)| dir)
        .collect();
    let excess = earlier.len().saturating_sub(keep - 1);
    for dir in &earlier[..excess] {
        tracing::debug!(dir = %dir.display(), "pruning checkpoint");
        fs::remove_dir_all(dir).map_err(LearnerError::io(*dir))?;
    }
    Ok(())
}

/// Replaces `root/latest` atomically with `name`.
fn write_latest(root: &Path, name: &str) -> Result<()> {
    let tmp = root.join(format!("{TMP_PREFIX}{LATEST_FILE}-{}", std::process::id()));
    let mut file = fs::File::create(&tmp).map_err(LearnerError::io(&tmp))?;
    file.write_all(format!("{name}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(LearnerError::io(&tmp))?;
    rename(&tmp, &root.join(LATEST_FILE))?;
    sync_dir(root)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(LearnerError::io(from))
}

fn remove_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(LearnerError::io(path))
}

/// Flushes every file under `dir` and the directories themselves to disk, so a rename that
/// survives a power loss never names a directory with missing data.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(LearnerError::io(dir))? {
        let path = entry.map_err(LearnerError::io(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(LearnerError::io(&path))?;
        }
    }
    sync_dir(dir)
}

/// Flushes a directory's entries (new names, renames) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(LearnerError::io(dir))
}
