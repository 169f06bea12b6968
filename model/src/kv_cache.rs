//! The preallocated key/value cache the sampler decodes with, and the memory budget that
//! sizes it.
//!
//! A cache holds `slots` rows of up to `capacity` key/value columns per layer, allocated once.
//! Each slot is one sequence; slots fill at their own pace, so a forward either writes a block
//! of columns at the same offset in a range of slots (a prefill), or one column per slot, each
//! at that slot's own length (a decode step of a continuously refilled batch). Which keys a
//! query may see is the caller's key mask; the cache only stores and hands out columns.
//!
//! A token takes [`kv_bytes_per_token`] bytes in every slot it fills; [`KvBudget`] bounds what
//! a sampling call's cache may take, and [`cache_layout`] turns a budget into slots.
use std::fmt;

use tch::{Device, Kind, Tensor};

use crate::config::Qwen2Config;
use crate::device::cuda_memory_info;
use crate::error::{ModelError, Result};
use crate::qwen2::Qwen2;

/// Bytes one token takes in the cache of a model with `config` computing in `kind`: its key
/// and its value in every layer, `2 x layers x kv_heads x head_dim x dtype size`.
pub fn kv_bytes_per_token(config: &Qwen2Config, kind: Kind) -> u64 {
    let elements = 2 * config.num_hidden_layers * config.num_kv_heads() * config.head_dim();
    elements as u64 * kind.elt_size_in_bytes() as u64
}

/// Share of the device memory free when a CUDA sampler resolves its default budget that its
/// KV cache may take; the rest is left to the prefill's and the decode steps' activations,
/// the logits and the allocator.
pub const CUDA_FREE_MEMORY_FRACTION: f64 = 0.5;

/// How much memory the KV cache of a sampling call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvBudget {
    /// No bound: as many slots as rows are asked for.
    Unlimited,
    /// At most this many bytes of keys and values.
    Bytes(u64),
}

impl KvBudget {
    /// A budget of `gib` GiB (2^30 bytes); it must be positive and finite.
    pub fn from_gib(gib: f64) -> Result<Self> {
        if !(gib.is_finite() && gib > 0.0) {
            return Err(ModelError::Input(format!(
                "the KV cache budget must be a positive number of GiB, got {gib}"
            )));
        }
        Ok(Self::Bytes((gib * GIB) as u64))
    }

    /// The default budget of a sampler on `device`: unlimited on the CPU; on CUDA
    /// [`CUDA_FREE_MEMORY_FRACTION`] of the device memory free now (what the driver reports,
    /// so memory libtorch's allocator keeps cached counts as taken), or unlimited when the
    /// driver cannot be asked.
    pub fn device_default(device: Device) -> Self {
        let Device::Cuda(ordinal) = device else {
            return Self::Unlimited;
        };
        match cuda_memory_info(ordinal) {
            Some((free, _)) => Self::Bytes((free as f64 * CUDA_FREE_MEMORY_FRACTION) as u64),
            None => {
                tracing::warn!(
                    ordinal,
                    "cannot read the free memory of the CUDA device; the KV cache is unbounded"
                );
                Self::Unlimited
            }
        }
    }

    /// `gib` GiB when given, else [`KvBudget::device_default`] for `device`.
    pub fn resolve(gib: Option<f64>, device: Device) -> Result<Self> {
        match gib {
            Some(gib) => Self::from_gib(gib),
            None => Ok(Self::device_default(device)),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl fmt::Display for KvBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unlimited => write!(f, "unlimited"),
            Self::Bytes(bytes) => write!(f, "{bytes} bytes ({:.3} GiB)", *bytes as f64 / GIB),
        }
    }
}

/// How a sampling call lays out its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheLayout {
    /// Slots: sequences decoding at once.
    pub rows: usize,
    /// Columns per slot: the longest prompt plus the most new tokens.
    pub columns: i64,
    /// Whether a prompt whose samples straddle two admissions keeps its prefill's keys and
    /// values (one more slot of the longest prompt's length) rather than being prefilled
    /// again for the later ones.
    pub keep_prefix: bool,
}

/// The layout of a call over `prompts` prompts of at most `longest` tokens with up to
/// `max_new` new tokens each, at most `max_rows` decoding at once, within `budget` at
/// `bytes_per_token`: as many slots of `longest + max_new` columns as the budget holds (at
/// most `max_rows` and `prompts`), and the kept prefix when the rest of the budget holds it
/// too. `Err(bytes)`: one slot alone needs `bytes`, more than the budget.
pub(crate) fn cache_layout(
    budget: KvBudget,
    bytes_per_token: u64,
    longest: i64,
    max_new: i64,
    max_rows: usize,
    prompts: usize,
) -> std::result::Result<CacheLayout, u64> {
    let columns = longest + max_new;
    let wanted = max_rows.min(prompts).max(1);
    let (rows, keep_prefix) = match budget {
        KvBudget::Unlimited => (wanted, true),
        KvBudget::Bytes(budget) => {
            let row = bytes_per_token * columns as u64;
            let fit = budget / row;
            if fit == 0 {
                return Err(row);
            }
            let rows = wanted.min(usize::try_from(fit).unwrap_or(usize::MAX));
            let left = budget - rows as u64 * row;
            (rows, left >= bytes_per_token * longest as u64)
        }
    };
    Ok(CacheLayout {
        rows,
        columns,
        keep_prefix,
    })
}

/// Where the next forward writes its keys and values, and which columns it reads back.
#[derive(Debug)]
enum Target {
    /// `t` new columns from `offset` in slots `start..start + rows`; reads columns
    /// `0..offset + t` of those slots.
    Block { start: i64, rows: i64, offset: i64 },
    /// One new column per slot in slots `0..rows`, at column `columns[row]`
    /// (`[2, rows, kv_heads, 1, head_dim]` int64, keys then values, as `scatter_` wants it);
    /// reads columns `0..key_len` of those slots.
    PerSlot {
        rows: i64,
        columns: Tensor,
        key_len: i64,
    },
}

/// Keys and values of each layer in one tensor, `[2, slots, kv_heads, capacity, head_dim]`
/// (index 0 of the first dimension holds keys, 1 values), so that a layer's new keys and
/// values are one write. Layers have tensors of their own: a forward with autograd may keep a
/// layer's keys while the next layer writes its own.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Tensor>,
    /// Per layer: views of its keys and of its values, made once.
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    capacity: i64,
    target: Target,
}

impl KvCache {
    /// An empty cache of `slots` rows of up to `capacity` columns for `model`, in its compute
    /// dtype and on its device. It targets all slots from column 0 until told otherwise.
    pub fn new(model: &Qwen2, slots: i64, capacity: i64) -> Self {
        let c = model.config();
        let shape = [2, slots, c.num_kv_heads(), capacity, c.head_dim()];
        let options = (model.compute_kind(), model.device());
        let layers: Vec<Tensor> = (0..c.num_hidden_layers)
            .map(|_| Tensor::zeros(shape, options))
            .collect();
        Self::from_layers(layers, slots, capacity)
    }

    fn from_layers(layers: Vec<Tensor>, slots: i64, capacity: i64) -> Self {
        Self {
            keys: layers.iter().map(|l| l.get(0)).collect(),
            values: layers.iter().map(|l| l.get(1)).collect(),
            layers,
            capacity,
            target: Target::Block {
                start: 0,
                rows: slots,
                offset: 0,
            },
        }
    }

    /// Columns per slot.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// The next forward writes its `T` tokens at columns `offset..offset + T` of slots
    /// `start..start + rows` and attends over columns `0..offset + T` of them.
    pub fn target_block(&mut self, start: i64, rows: i64, offset: i64) {
        self.target = Target::Block {
            start,
            rows,
            offset,
        };
    }

    /// The next forward is one token per slot for slots `0..columns.len()`: slot `i` writes
    /// at column `columns[i]` (a `[rows]` int64 tensor on the cache's device) and attends over
    /// columns `0..key_len`, as the key mask of that forward says.
    pub fn target_per_slot(&mut self, columns: &Tensor, key_len: i64) {
        let rows = columns.size()[0];
        let shape = self.keys[0].size();
        let columns = columns
            .view([1, rows, 1, 1, 1])
            .expand([2, rows, shape[1], 1, shape[3]], false);
        self.target = Target::PerSlot {
            rows,
            columns,
            key_len,
        };
    }

    /// The key slot of the forward's first query, which the causal mask needs: the block
    /// offset, or for a per-slot step the last key column (each query is its slot's newest
    /// key, which the key mask places).
    pub fn query_offset(&self) -> i64 {
        match &self.target {
            Target::Block { offset, .. } => *offset,
            Target::PerSlot { key_len, .. } => key_len - 1,
        }
    }

    /// Whether the next forward is a per-slot decode step (one token per slot).
    pub fn is_per_slot(&self) -> bool {
        matches!(self.target, Target::PerSlot { .. })
    }

    /// The slots the target covers and the columns the forward attends over.
    fn span(&self) -> (i64, i64, i64) {
        match &self.target {
            Target::Block {
                start,
                rows,
                offset,
            } => (*start, *rows, *offset),
            Target::PerSlot { rows, key_len, .. } => (0, *rows, key_len - 1),
        }
    }

    /// Layer `layer`'s keys and values over the target's slots and its first `columns`
    /// columns, `[rows, kv_heads, columns, head_dim]` each.
    fn read(&self, layer: usize, columns: i64) -> (Tensor, Tensor) {
        let (start, rows, _) = self.span();
        let view = |t: &Tensor| t.narrow(0, start, rows).narrow(2, 0, columns);
        (view(&self.keys[layer]), view(&self.values[layer]))
    }

    /// Stores layer `layer`'s new keys and values (`[rows, kv_heads, T, head_dim]`) where the
    /// target says and returns all the keys and values the forward attends over.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let kv = Tensor::stack(&[k, v], 0);
        self.write(layer, &kv)
    }

    /// [`KvCache::append`] for keys and values in the layout of a fused q/k/v projection:
    /// `kv` is `[rows, T, 2 * kv_heads, head_dim]`, the key heads then the value heads.
    pub fn append_fused(&mut self, layer: usize, kv: &Tensor) -> (Tensor, Tensor) {
        let size = kv.size();
        let (rows, t, heads, head_dim) = (size[0], size[1], size[2] / 2, size[3]);
        let kv = kv
            .view([rows, t, 2, heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        self.write(layer, &kv)
    }

    /// Writes `kv` (`[2, rows, kv_heads, T, head_dim]`: keys, values) where the target says
    /// and reads back what the forward attends over.
    fn write(&mut self, layer: usize, kv: &Tensor) -> (Tensor, Tensor) {
        let t = kv.size()[3];
        let (start, rows, offset) = self.span();
        let layer_data = &self.layers[layer];
        match &self.target {
            Target::Block { .. } => {
                assert!(
                    offset + t <= self.capacity,
                    "KV cache overflow: {offset} + {t} > {}",
                    self.capacity
                );
                layer_data
                    .narrow(1, start, rows)
                    .narrow(3, offset, t)
                    .copy_(kv);
            }
            Target::PerSlot { columns, .. } => {
                assert!(
                    offset < self.capacity,
                    "KV cache overflow: {} > {}",
                    offset + 1,
                    self.capacity
                );
                let _ = layer_data.narrow(1, 0, rows).scatter_(3, columns, kv);
            }
        }
        self.read(layer, offset + t)
    }

    /// Copies the first `columns` columns of row `row` of `source` (another cache of the same
    /// model) into slots `start..start + count`: the K samples of a prompt forked from one
    /// prefill.
    pub fn fork_from(&mut self, source: &KvCache, row: i64, start: i64, count: i64, columns: i64) {
        for (dst, src) in self.layers.iter().zip(&source.layers) {
            dst.narrow(1, start, count)
                .narrow(3, 0, columns)
                .copy_(&src.narrow(1, row, 1).narrow(3, 0, columns));
        }
    }

    /// Copies the first `columns` columns of slot `row` into slots `start..start + count`,
    /// which must not include `row`: the K samples of a prompt forked from its prefill.
    pub fn fork_within(&mut self, row: i64, start: i64, count: i64, columns: i64) {
        debug_assert!(
            row < start || row >= start + count,
            "fork onto its own slot"
        );
        for t in &self.layers {
            t.narrow(1, start, count)
                .narrow(3, 0, columns)
                .copy_(&t.narrow(1, row, 1).narrow(3, 0, columns));
        }
    }

    /// A one-slot cache of `columns` columns holding a copy of slot `slot`'s first `columns`
    /// columns (its own memory: later writes to this cache do not reach it).
    pub fn copy_of_slot(&self, slot: i64, columns: i64) -> KvCache {
        let layers = self
            .layers
            .iter()
            .map(|t| {
                let source = t.narrow(1, slot, 1).narrow(3, 0, columns);
                let mut copy = Tensor::empty(source.size(), (source.kind(), source.device()));
                copy.copy_(&source);
                copy
            })
            .collect();
        Self::from_layers(layers, 1, columns)
    }

    /// Moves the first `columns` columns of slot `from` into slot `to` (compaction: the
    /// running slots stay at the front, so a decode step covers `0..running`).
    pub fn move_slot(&mut self, from: i64, to: i64, columns: i64) {
        for t in &self.layers {
            t.narrow(1, to, 1)
                .narrow(3, 0, columns)
                .copy_(&t.narrow(1, from, 1).narrow(3, 0, columns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: i64, heads: i64, kv_heads: i64, hidden: i64) -> Qwen2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 100,
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
        }))
        .unwrap()
    }

    #[test]
    fn bytes_per_token_of_qwen25_7b() {
        // 2 x 28 layers x 4 kv heads x 128 head dim x 2 bytes (bf16) = 57,344.
        let c = config(28, 28, 4, 3584);
        assert_eq!(kv_bytes_per_token(&c, Kind::BFloat16), 57_344);
        assert_eq!(kv_bytes_per_token(&c, Kind::Float), 114_688);
        // 2 x 3 x 2 x 16 x 4 = 768.
        assert_eq!(kv_bytes_per_token(&config(3, 4, 2, 64), Kind::Float), 768);
    }

    #[test]
    fn a_budget_holds_whole_slots_and_refuses_less_than_one() {
        // 100 bytes a token, slots of 10 + 20 = 30 columns: 3,000 bytes a slot.
        let layout =
            |budget, max_rows, prompts| cache_layout(budget, 100, 10, 20, max_rows, prompts);
        let unlimited = layout(KvBudget::Unlimited, 8, 5).unwrap();
        assert_eq!(
            (unlimited.rows, unlimited.columns, unlimited.keep_prefix),
            (5, 30, true)
        );
        assert_eq!(layout(KvBudget::Unlimited, 2, 5).unwrap().rows, 2);
        // 10,000 bytes: 3 slots (9,000); the 1,000 left hold a prefix of 10 tokens.
        let three = layout(KvBudget::Bytes(10_000), 8, 5).unwrap();
        assert_eq!((three.rows, three.keep_prefix), (3, true));
        // 9,500 bytes: 3 slots, 500 left, too little for a prefix.
        let tight = layout(KvBudget::Bytes(9_500), 8, 5).unwrap();
        assert_eq!((tight.rows, tight.keep_prefix), (3, false));
        // Fewer rows asked for than fit: the rest keeps the prefix.
        assert_eq!(layout(KvBudget::Bytes(9_500), 2, 5).unwrap().rows, 2);
        assert_eq!(layout(KvBudget::Bytes(3_000), 8, 5).unwrap().rows, 1);
        assert_eq!(layout(KvBudget::Bytes(2_999), 8, 5), Err(3_000));
    }

    #[test]
    fn budgets_from_gib_and_by_device() {
        assert_eq!(KvBudget::from_gib(1.5).unwrap(), KvBudget::Bytes(3 << 29));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(KvBudget::from_gib(bad).is_err(), "{bad}");
        }
        assert_eq!(KvBudget::device_default(Device::Cpu), KvBudget::Unlimited);
        assert_eq!(
            KvBudget::resolve(None, Device::Cpu).unwrap(),
            KvBudget::Unlimited
        );
        assert_eq!(
            KvBudget::resolve(Some(2.0), Device::Cpu).unwrap(),
            KvBudget::Bytes(2 << 30)
        );
        assert_eq!(
            KvBudget::Bytes(3 << 29).to_string(),
            "1610612736 bytes (1.500 GiB)"
        );
    }
}
