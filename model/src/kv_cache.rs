//! The preallocated key/value cache the sampler decodes with.
//!
//! A cache holds `slots` rows of up to `capacity` key/value columns per layer, allocated once.
//! Each slot is one sequence; slots fill at their own pace, so a forward either writes a block
//! of columns at the same offset in a range of slots (a prefill), or one column per slot, each
//! at that slot's own length (a decode step of a continuously refilled batch). Which keys a
//! query may see is the caller's key mask; the cache only stores and hands out columns.
use tch::Tensor;

use crate::qwen2::Qwen2;

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
