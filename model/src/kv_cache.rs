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
    /// (`[rows, kv_heads, 1, head_dim]` int64, as `scatter_` wants it); reads columns
    /// `0..key_len` of those slots.
    PerSlot {
        rows: i64,
        columns: Tensor,
        key_len: i64,
    },
}

/// Keys and values of every layer, `[slots, kv_heads, capacity, head_dim]` each.
#[derive(Debug)]
pub struct KvCache {
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
        let shape = [slots, c.num_kv_heads(), capacity, c.head_dim()];
        let options = (model.compute_kind(), model.device());
        let layers = c.num_hidden_layers as usize;
        Self {
            keys: (0..layers).map(|_| Tensor::zeros(shape, options)).collect(),
            values: (0..layers).map(|_| Tensor::zeros(shape, options)).collect(),
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
            .view([rows, 1, 1, 1])
            .expand([rows, shape[1], 1, shape[3]], false);
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

    /// Stores layer `layer`'s new keys and values (`[rows, kv_heads, T, head_dim]`) where the
    /// target says and returns all the keys and values the forward attends over.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        match &self.target {
            Target::Block {
                start,
                rows,
                offset,
            } => {
                let t = k.size()[2];
                assert!(
                    offset + t <= self.capacity,
                    "KV cache overflow: {offset} + {t} > {}",
                    self.capacity
                );
                let (keys, values) = (
                    keys.narrow(0, *start, *rows),
                    values.narrow(0, *start, *rows),
                );
                keys.narrow(2, *offset, t).copy_(k);
                values.narrow(2, *offset, t).copy_(v);
                (
                    keys.narrow(2, 0, offset + t),
                    values.narrow(2, 0, offset + t),
                )
            }
            Target::PerSlot {
                rows,
                columns,
                key_len,
            } => {
                assert!(
                    *key_len <= self.capacity,
                    "KV cache overflow: {key_len} > {}",
                    self.capacity
                );
                let mut keys = keys.narrow(0, 0, *rows);
                let mut values = values.narrow(0, 0, *rows);
                let _ = keys.scatter_(2, columns, k);
                let _ = values.scatter_(2, columns, v);
                (keys.narrow(2, 0, *key_len), values.narrow(2, 0, *key_len))
            }
        }
    }

    /// Copies the first `columns` columns of row `row` of `source` (another cache of the same
    /// model) into slots `start..start + count`: the K samples of a prompt forked from one
    /// prefill.
    pub fn fork_from(&mut self, source: &KvCache, row: i64, start: i64, count: i64, columns: i64) {
        for (dst, src) in self
            .keys
            .iter()
            .zip(&source.keys)
            .chain(self.values.iter().zip(&source.values))
        {
            dst.narrow(0, start, count)
                .narrow(2, 0, columns)
                .copy_(&src.narrow(0, row, 1).narrow(2, 0, columns));
        }
    }

    /// Moves the first `columns` columns of slot `from` into slot `to` (compaction: the
    /// running slots stay at the front, so a decode step covers `0..running`).
    pub fn move_slot(&mut self, from: i64, to: i64, columns: i64) {
        for t in self.keys.iter().chain(&self.values) {
            t.narrow(0, to, 1)
                .narrow(2, 0, columns)
                .copy_(&t.narrow(0, from, 1).narrow(2, 0, columns));
        }
    }
}
