//! Qwen2 / Qwen2.5 decoder-only causal LM, as in transformers' `modeling_qwen2.py`.
//!
//! One struct per layer with a `forward`. Variables are created under Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so loading a checkpoint is a copy by name.
//! Weights may be stored in one dtype (f32 masters for training) and computed in another
//! (bf16): every layer casts its weights to the activation dtype, which is a no-op when they
//! agree and differentiable when they do not.
//!
//! Every forward runs the same layer code (`DecoderLayer::forward`); what differs is where
//! q/k/v and gate/up come from (`Projections`). Training and log-probs use the layers'
//! variables, one matmul per projection, which autograd records. Sampling with a KV cache
//! (grad mode off, see [`Qwen2::forward`]) runs a leaner path: each layer's q/k/v projections
//! are one matmul and its gate/up projections another, over weights the VarStore's variables
//! are views of (see [`FusedLayer`]), RoPE rotates q and k in one op, and a decode step
//! attends with two batched matmuls.
//!
//! The backward passes that recompute activations to save memory, and the [`GradSink`] that
//! takes gradients stage by stage, are in [`crate::training`].
//!
//! [`GradSink`]: crate::training::GradSink
use std::sync::{Mutex, PoisonError};

use tch::{nn, Device, Kind, Tensor};

use crate::config::Qwen2Config;
use crate::kv_cache::KvCache;
use crate::training::{ParamGather, Stage, WholeParams};

/// A dense layer `y = x W^T + b` with HF parameter names `weight` (`[out, in]`) and `bias`.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    fn new(path: nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: Init) -> Self {
        let weight = path.var("weight", &[out_dim, in_dim], init.matrix());
        let bias = bias.then(|| path.var("bias", &[out_dim], nn::Init::Const(0.0)));
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let bias = self.bias.as_ref().map(|b| cast(b, kind));
        x.linear(&cast(&self.weight, kind), bias.as_ref())
    }
}

/// `t` in dtype `kind`; a handle to the same tensor when it already is (keeps the per-token
/// decode path free of no-op dispatches).
fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// RMSNorm: statistics in f32, then scaled by `weight` in the activation dtype.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        let weight = path.var("weight", &[dim], nn::Init::Const(1.0));
        Self { weight, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = cast(x, Kind::Float);
        let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = cast(&(h * (variance + self.eps).rsqrt()), kind);
        cast(&self.weight, kind) * normed
    }
}

/// Rotary position embedding tables in HF's rotate-half layout, indexed by position id so
/// that left-padded rows get the positions of their real tokens.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// `sin` with its first half negated: `rotate_half(x) * sin` is
    /// `swap_halves(x) * signed_sin`, which needs no negation of `x`.
    signed_sin: Tensor,
}

impl Rope {
    fn new(head_dim: i64, max_positions: i64, theta: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = Tensor::from(theta)
            .to_kind(Kind::Float)
            .to_device(device)
            .pow(&exponents)
            .reciprocal();
        let positions = Tensor::arange(max_positions, (Kind::Float, device));
        let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let sin = emb.sin();
        let half = head_dim / 2;
        let signed_sin = Tensor::cat(
            &[sin.narrow(1, 0, half).neg(), sin.narrow(1, half, half)],
            1,
        );
        Self {
            cos: emb.cos(),
            sin,
            signed_sin,
        }
    }

    /// `cos` and `sin` for `position_ids` (`[B, T]`), shaped `[B, 1, T, head_dim]`.
    fn tables(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let lookup = |table: &Tensor| {
            table
                .index_select(0, &position_ids.flatten(0, -1))
                .view([position_ids.size()[0], 1, position_ids.size()[1], -1])
                .to_kind(kind)
        };
        (lookup(&self.cos), lookup(&self.sin))
    }

    /// Per-head tables for [`rotate_heads`] over `[B, T, rotated + plain, head_dim]`: the
    /// first `rotated` heads get the rotation at `position_ids` (`[B, T]`), the last `plain`
    /// ones cos 1 and sin 0, which leaves them as they are. Returns `(cos, signed_sin)`.
    fn head_tables(
        &self,
        position_ids: &Tensor,
        kind: Kind,
        rotated: i64,
        plain: i64,
    ) -> (Tensor, Tensor) {
        let (b, t) = (position_ids.size()[0], position_ids.size()[1]);
        let head_dim = self.cos.size()[1];
        let ids = position_ids.flatten(0, -1);
        let table = |values: &Tensor, fill: f64| {
            let rows = values.index_select(0, &ids).view([b, t, 1, head_dim]);
            let rest = Tensor::full([1, 1, 1, 1], fill, (values.kind(), values.device()));
            Tensor::cat(
                &[
                    rows.expand([b, t, rotated, head_dim], false),
                    rest.expand([b, t, plain, head_dim], false),
                ],
                2,
            )
            .to_kind(kind)
        };
        (table(&self.cos, 1.0), table(&self.signed_sin, 0.0))
    }
}

/// RoPE on every head of `x` (`[B, T, heads, head_dim]`) with [`Rope::head_tables`]:
/// `x * cos + swap_halves(x) * signed_sin`, equal to [`apply_rope`] head by head.
fn rotate_heads(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let size = x.size();
    let swapped = x
        .view([size[0], size[1], size[2], 2, size[3] / 2])
        .flip([3])
        .view([size[0], size[1], size[2], size[3]]);
    (x * cos).addcmul_(&swapped, signed_sin)
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = cat(-x2, x1)`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    x * cos + rotated * sin
}

/// Grouped-query self-attention with q/k/v biases.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(path: nn::Path, c: &Qwen2Config, init: Init) -> Self {
        let (d, h, kv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
        );
        Self {
            q_proj: Linear::new(&path / "q_proj", d, h * hd, true, init),
            k_proj: Linear::new(&path / "k_proj", d, kv * hd, true, init),
            v_proj: Linear::new(&path / "v_proj", d, kv * hd, true, init),
            o_proj: Linear::new(&path / "o_proj", h * hd, d, false, init),
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
        }
    }

    /// The block on `x` (`[B, T, hidden]`) for one layer of a forward that `pass` describes,
    /// with q/k/v from `projections` and, with `cache` (the cache and this layer's index),
    /// attending over the cached keys and values as well as the new ones, which it stores.
    fn forward(
        &self,
        x: &Tensor,
        projections: Projections<'_>,
        pass: &LayerPass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, k, v) = match projections {
            Projections::Separate => self.separate_qkv(x, &pass.rope, cache),
            Projections::Fused(fused) => self.fused_qkv(x, fused, &pass.rope, cache),
        };
        match &pass.decode_bias {
            Some(bias) => {
                let y = self.decode_attention(&q, &k, &v, bias);
                self.o_proj
                    .forward(&y.view([b, t, self.num_heads * self.head_dim]))
            }
            None => self.sdpa_and_project(&q, &k, &v, pass.mask.as_ref(), b, t),
        }
    }

    /// Queries `[B, heads, T, head_dim]` and the keys and values to attend over
    /// (`[B, kv_heads, S, head_dim]`) from one matmul per projection and RoPE on q and k
    /// (`rope` from [`Rope::tables`]); the new keys and values go to `cache`.
    fn separate_qkv(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        cache: Option<(&mut KvCache, usize)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        let q = heads(self.q_proj.forward(x), self.num_heads);
        let k = heads(self.k_proj.forward(x), self.num_kv_heads);
        let v = heads(self.v_proj.forward(x), self.num_kv_heads);
        let q = apply_rope(&q, &rope.0, &rope.1);
        let k = apply_rope(&k, &rope.0, &rope.1);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v),
            None => (k, v),
        };
        (q, k, v)
    }

    /// [`Attention::separate_qkv`] on the fused q/k/v projection: one matmul and one RoPE op
    /// over q and k (`rope` from [`Rope::head_tables`] with `num_heads + num_kv_heads`
    /// rotated heads and `num_kv_heads` plain ones), one cache write.
    fn fused_qkv(
        &self,
        x: &Tensor,
        fused: &FusedLayer,
        rope: &(Tensor, Tensor),
        cache: Option<(&mut KvCache, usize)>,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let kind = x.kind();
        let (h, kv) = (self.num_heads, self.num_kv_heads);
        let qkv = x
            .linear(
                &cast(&fused.qkv_weight, kind),
                Some(&cast(&fused.qkv_bias, kind)),
            )
            .view([b, t, h + 2 * kv, self.head_dim]);
        let qkv = rotate_heads(&qkv, &rope.0, &rope.1);
        let q = qkv.narrow(2, 0, h).transpose(1, 2);
        let new_kv = qkv.narrow(2, h, 2 * kv);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append_fused(layer, &new_kv),
            None => (
                new_kv.narrow(2, 0, kv).transpose(1, 2),
                new_kv.narrow(2, kv, kv).transpose(1, 2),
            ),
        };
        (q, k, v)
    }

    /// SDPA over `[b, heads, t, head_dim]` queries and the keys and values (grouped-query when
    /// they have fewer heads), then the output projection back to `[b, t, hidden]`. Without a
    /// `mask` it is causal (`is_causal`, query `i` attends to keys `0..=i`), which lets CUDA
    /// run its flash kernel instead of materialising `[b, heads, t, t]` scores.
    fn sdpa_and_project(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        b: i64,
        t: i64,
    ) -> Tensor {
        let y = Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            mask,
            0.0,
            mask.is_none(),
            None::<f64>,
            self.num_heads != self.num_kv_heads,
        );
        self.o_proj.forward(
            &y.transpose(1, 2)
                .reshape([b, t, self.num_heads * self.head_dim]),
        )
    }

    /// Attention of one query per row: `q` is `[B, heads, 1, head_dim]`, `k` and `v`
    /// `[B, kv_heads, S, head_dim]`, `bias` the `[B * kv_heads, 1, S]` additive key mask.
    /// Query head `i` reads kv head `i / (heads / kv_heads)`, as SDPA's GQA does. Scores are
    /// `bias + q k^T / sqrt(head_dim)`, softmax in f32. Returns `[B * kv_heads, group,
    /// head_dim]`, which is `[B, heads * head_dim]` in memory.
    fn decode_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
        let (b, s) = (q.size()[0], k.size()[2]);
        let (kv, hd) = (self.num_kv_heads, self.head_dim);
        let group = self.num_heads / kv;
        let q = q.reshape([b * kv, group, hd]);
        let scores = bias.baddbmm(
            &q,
            &k.reshape([b * kv, s, hd]).transpose(1, 2),
            1.0,
            1.0 / (hd as f64).sqrt(),
        );
        let probs = cast(&scores.softmax(-1, Kind::Float), q.kind());
        probs.bmm(&v.reshape([b * kv, s, hd]))
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn new(path: nn::Path, c: &Qwen2Config, init: Init) -> Self {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        Self {
            gate_proj: Linear::new(&path / "gate_proj", d, f, false, init),
            up_proj: Linear::new(&path / "up_proj", d, f, false, init),
            down_proj: Linear::new(&path / "down_proj", f, d, false, init),
        }
    }

    /// The block on `x`, with gate/up from `projections`. On fused ones (sampling, no
    /// autograd) SiLU and the product run in place on the one gate/up output.
    fn forward(&self, x: &Tensor, projections: Projections<'_>) -> Tensor {
        let hidden = match projections {
            Projections::Separate => self.gate_proj.forward(x).silu() * self.up_proj.forward(x),
            Projections::Fused(fused) => {
                let f = fused.gate_up_weight.size()[0] / 2;
                let gate_up = x.linear(&cast(&fused.gate_up_weight, x.kind()), None::<Tensor>);
                let mut gate = gate_up.narrow(-1, 0, f);
                let _ = gate.silu_();
                let _ = gate.g_mul_(&gate_up.narrow(-1, f, f));
                gate
            }
        };
        self.down_proj.forward(&hidden)
    }
}

/// One layer's q/k/v projections (`[(heads + 2 kv_heads) * head_dim, hidden]` and the
/// biases) and gate/up projections (`[2 * intermediate, hidden]`) as single tensors.
///
/// The VarStore keeps Hugging Face names and shapes, so these are not variables of their own:
/// [`FusedLayer::new`] moves the layer's variables into them (each variable becomes a view of
/// its rows, `set_data`), and every in-place change of a variable (`copy_` from a checkpoint
/// or a weight sync, an optimizer step) is a change of the fused tensor. What can undo that
/// is a variable given new storage (`VarStore::set_kind` to another dtype, a move to another
/// device); [`FusedLayer::is_current`] notices by address, and the model fuses again.
#[derive(Debug)]
pub(crate) struct FusedLayer {
    qkv_weight: Tensor,
    qkv_bias: Tensor,
    gate_up_weight: Tensor,
}

impl FusedLayer {
    /// Fuses `layer`'s variables with their current values; they become views of the result.
    fn new(layer: &DecoderLayer) -> Self {
        let (attn, mlp) = (&layer.self_attn, &layer.mlp);
        let bias = |l: &Linear| {
            l.bias
                .as_ref()
                .expect("Qwen2 q/k/v projections have biases")
                .shallow_clone()
        };
        Self {
            qkv_weight: fuse_rows(&[
                &attn.q_proj.weight,
                &attn.k_proj.weight,
                &attn.v_proj.weight,
            ]),
            qkv_bias: fuse_rows(&[
                &bias(&attn.q_proj),
                &bias(&attn.k_proj),
                &bias(&attn.v_proj),
            ]),
            gate_up_weight: fuse_rows(&[&mlp.gate_proj.weight, &mlp.up_proj.weight]),
        }
    }

    /// Holds nothing: [`FusedLayer::is_current`] is false, so the next use fuses again.
    fn empty() -> Self {
        Self {
            qkv_weight: Tensor::new(),
            qkv_bias: Tensor::new(),
            gate_up_weight: Tensor::new(),
        }
    }

    /// Whether `layer`'s variables still are the rows of these tensors.
    fn is_current(&self, layer: &DecoderLayer) -> bool {
        if !self.qkv_weight.defined() {
            return false;
        }
        let (attn, mlp) = (&layer.self_attn, &layer.mlp);
        let bias = |l: &Linear| l.bias.as_ref().map(Tensor::shallow_clone);
        let (qb, kb, vb) = (bias(&attn.q_proj), bias(&attn.k_proj), bias(&attn.v_proj));
        let (Some(qb), Some(kb), Some(vb)) = (qb, kb, vb) else {
            return false;
        };
        holds_rows(
            &self.qkv_weight,
            &[
                &attn.q_proj.weight,
                &attn.k_proj.weight,
                &attn.v_proj.weight,
            ],
        ) && holds_rows(&self.qkv_bias, &[&qb, &kb, &vb])
            && holds_rows(
                &self.gate_up_weight,
                &[&mlp.gate_proj.weight, &mlp.up_proj.weight],
            )
    }

    /// Handles to the same tensors.
    fn shallow_clone(&self) -> Self {
        Self {
            qkv_weight: self.qkv_weight.shallow_clone(),
            qkv_bias: self.qkv_bias.shallow_clone(),
            gate_up_weight: self.gate_up_weight.shallow_clone(),
        }
    }
}

/// Concatenates `parts` along dim 0 (their current values, no autograd) and makes each a
/// view of its rows of the result, which it returns.
fn fuse_rows(parts: &[&Tensor]) -> Tensor {
    let fused = tch::no_grad(|| {
        let parts: Vec<Tensor> = parts.iter().map(|p| p.contiguous()).collect();
        Tensor::cat(&parts, 0)
    });
    let mut row = 0;
    for part in parts {
        let rows = part.size()[0];
        part.shallow_clone().set_data(&fused.narrow(0, row, rows));
        row += rows;
    }
    fused
}

/// Whether `parts` are, in order, the consecutive rows of `fused` (same device and dtype, each
/// starting at the address where the previous one ends).
fn holds_rows(fused: &Tensor, parts: &[&Tensor]) -> bool {
    let kind = fused.kind();
    let device = fused.device();
    let mut address = fused.data_ptr() as usize;
    let mut rows = 0;
    for part in parts {
        if part.kind() != kind || part.device() != device || part.data_ptr() as usize != address {
            return false;
        }
        let size = part.size();
        rows += size[0];
        address += part.numel() * kind.elt_size_in_bytes();
    }
    rows == fused.size()[0]
}

/// Where a layer's forward takes its q/k/v and gate/up projections from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Projections<'a> {
    /// The layer's variables, one matmul per projection: what autograd records (training,
    /// log-probs). Wants [`Rope::tables`].
    Separate,
    /// The layer's fused tensors ([`FusedLayer`]), one matmul for q/k/v and one for gate/up,
    /// for sampling without autograd. Wants [`Rope::head_tables`].
    Fused(&'a FusedLayer),
}

/// What every decoder layer of one forward shares.
#[derive(Debug)]
pub(crate) struct LayerPass {
    /// Boolean attention mask `[B, 1, T, S]` ([`attention_mask`]), or `None` for plain causal
    /// attention without a mask (a right-padded batch without a cache, see
    /// [`Qwen2::forward_right_padded`]).
    mask: Option<Tensor>,
    /// RoPE tables in the form the forward's [`Projections`] want.
    rope: (Tensor, Tensor),
    /// A decode step on fused projections (one query per row): the additive key mask
    /// ([`decode_bias`]). Attention then is two batched matmuls
    /// ([`Attention::decode_attention`]), which beat SDPA's CPU kernel for a single query.
    decode_bias: Option<Tensor>,
}

/// Pre-norm decoder block: attention and MLP, each with a residual connection.
#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(path: nn::Path, c: &Qwen2Config, init: Init) -> Self {
        Self {
            self_attn: Attention::new(&path / "self_attn", c, init),
            mlp: Mlp::new(&path / "mlp", c, init),
            input_layernorm: RmsNorm::new(&path / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            post_attention_layernorm: RmsNorm::new(
                &path / "post_attention_layernorm",
                c.hidden_size,
                c.rms_norm_eps,
            ),
        }
    }

    /// The layer's parameters (handles), in a fixed order.
    pub(crate) fn parameters(&self) -> Vec<Tensor> {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
        .into_iter()
        .flat_map(|l| std::iter::once(&l.weight).chain(l.bias.as_ref()))
        .chain([
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ])
        .map(Tensor::shallow_clone)
        .collect()
    }

    /// The layer on `x` (`[B, T, hidden]`) for a forward that `pass` describes, with q/k/v
    /// and gate/up from `projections` and, with `cache`, over the cached keys and values too.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        projections: Projections<'_>,
        pass: &LayerPass,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x), projections, pass, cache);
        let h = x + attn;
        let out = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h), projections);
        h + out
    }
}

/// How new variables are initialised: zeros when a checkpoint will overwrite them, or
/// normal(0, std) as transformers' `_init_weights` does for training from scratch.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Normal { std: f64 },
}

impl Init {
    fn matrix(self) -> nn::Init {
        match self {
            Init::Zeros => nn::Init::Const(0.0),
            Init::Normal { std } => nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        }
    }
}

/// `Qwen2ForCausalLM`: embeddings, decoder layers, final norm and the LM head.
#[derive(Debug)]
pub struct Qwen2 {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// The LM head's weight; with tied embeddings it shares storage with `embed_tokens`.
    pub lm_head: Tensor,
    rope: Rope,
    config: Qwen2Config,
    compute_kind: Kind,
    /// Each layer's fused projections for the cached forward; refreshed when a variable left
    /// them (see [`FusedLayer`]).
    fused: Mutex<Vec<FusedLayer>>,
    /// A tensor that requires grad: an op on it records autograd exactly when grad mode is on.
    grad_probe: Tensor,
}

impl Qwen2 {
    /// Creates the variables under `root` (the VarStore root) with HF names.
    pub fn new(root: &nn::Path, config: &Qwen2Config, init: Init, compute_kind: Kind) -> Self {
        let model = root / "model";
        let embed_tokens = (&model / "embed_tokens").var(
            "weight",
            &[config.vocab_size, config.hidden_size],
            init.matrix(),
        );
        let layers: Vec<DecoderLayer> = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(&model / "layers" / i, config, init))
            .collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            (root / "lm_head").var(
                "weight",
                &[config.vocab_size, config.hidden_size],
                init.matrix(),
            )
        };
        let rope = Rope::new(
            config.head_dim(),
            config.max_position_embeddings,
            config.rope_theta(),
            root.device(),
        );
        let fused = Mutex::new(layers.iter().map(FusedLayer::new).collect());
        let grad_probe = Tensor::zeros([1], (Kind::Float, root.device())).set_requires_grad(true);
        Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            config: config.clone(),
            compute_kind,
            fused,
            grad_probe,
        }
    }

    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The dtype activations are computed in.
    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// Final hidden states `[B, T, D]` for `input_ids` (`[B, T]`).
    ///
    /// `position_ids` (`[B, T]`) are the RoPE positions. `key_mask` (`[B, S]`, bool) marks the
    /// real tokens among all keys the forward attends over: the cached columns and these `T`,
    /// where the cache's target (see [`KvCache`]) says which columns those are. A query
    /// attends causally to real keys and always to itself, so padding rows stay finite.
    ///
    /// With a cache and grad mode off (sampling), every layer runs on its fused projections
    /// ([`FusedLayer`]); the result is the same up to rounding.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let t = input_ids.size()[1];
        let offset = cache.as_ref().map_or(0, |c| c.query_offset());
        let mask = attention_mask(key_mask, offset, t);
        let sampling = cache.as_ref().filter(|_| !self.grad_enabled());
        let decode = sampling.is_some_and(|c| c.is_per_slot());
        let fused = sampling.map(|_| self.fused_layers());
        let pass = self.layer_pass(position_ids, Some(mask), fused.is_some(), decode);
        self.run_layers(input_ids, &pass, fused.as_deref(), cache)
    }

    /// Final hidden states `[B, T, D]` of a right-padded batch without a cache: every row's
    /// real tokens come first, `position_ids` (`[B, T]`) are their RoPE positions.
    ///
    /// Attention is plain causal, with no mask, so that SDPA can pick a fused kernel (flash
    /// or memory-efficient on CUDA) that never holds `[B, heads, T, T]` scores. A real token
    /// only sees the tokens before it, all real under right padding, so its hidden state is
    /// that of [`Qwen2::forward`] with the batch's key mask; a padding position attends to
    /// every position up to its own (finite, and read by nobody who masks padding).
    pub fn forward_right_padded(&self, input_ids: &Tensor, position_ids: &Tensor) -> Tensor {
        self.forward_right_padded_with(input_ids, position_ids, &mut WholeParams, |hidden| {
            hidden.shallow_clone()
        })
    }

    /// [`Qwen2::forward_right_padded`] for a model whose parameters `params` gathers stage by
    /// stage (ZeRO-3): each [`Stage`] is gathered just before it runs and released after;
    /// `head` gets the final hidden states while the final norm and the LM head are gathered
    /// (to compute logits from them), and its result is returned.
    pub fn forward_right_padded_with<R>(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        params: &mut dyn ParamGather,
        head: impl FnOnce(&Tensor) -> R,
    ) -> R {
        let pass = self.layer_pass(position_ids, None, false, false);
        let h = self.gathered_layers(input_ids, &pass, params, |_| {});
        params.gather(Stage::Head, None);
        let result = head(&self.norm.forward(&h));
        params.release(Stage::Head);
        result
    }

    /// The embeddings and every decoder layer (separate projections, no cache) under
    /// `pass`, each stage's parameters gathered by `params` just before it runs and released
    /// after, the next one named as a prefetch hint; `keep` gets each layer's input.
    /// Returns the last layer's output (before the final norm).
    pub(crate) fn gathered_layers(
        &self,
        input_ids: &Tensor,
        pass: &LayerPass,
        params: &mut dyn ParamGather,
        mut keep: impl FnMut(Tensor),
    ) -> Tensor {
        params.gather(Stage::Embedding, Some(self.stage_after(Stage::Embedding)));
        let mut h = self.embed(input_ids);
        params.release(Stage::Embedding);
        for (i, layer) in self.layers.iter().enumerate() {
            params.gather(Stage::Layer(i), Some(self.stage_after(Stage::Layer(i))));
            let next = layer.forward(&h, Projections::Separate, pass, None);
            params.release(Stage::Layer(i));
            keep(std::mem::replace(&mut h, next));
        }
        h
    }

    /// The stage a forward runs after `stage` (the head after the last layer, and itself).
    pub(crate) fn stage_after(&self, stage: Stage) -> Stage {
        let layers = self.layers.len();
        match stage {
            Stage::Embedding if layers > 0 => Stage::Layer(0),
            Stage::Layer(i) if i + 1 < layers => Stage::Layer(i + 1),
            _ => Stage::Head,
        }
    }

    /// The stages of a forward pass, in order.
    pub fn forward_stages(&self) -> Vec<Stage> {
        std::iter::once(Stage::Embedding)
            .chain((0..self.layers.len()).map(Stage::Layer))
            .chain(std::iter::once(Stage::Head))
            .collect()
    }

    /// Every parameter `stage` uses (handles; trainable or not): the embeddings, a layer's,
    /// or the final norm's and the LM head's (with tied embeddings, the embedding variable).
    pub fn stage_parameters(&self, stage: Stage) -> Vec<Tensor> {
        match stage {
            Stage::Embedding => vec![self.embed_tokens.shallow_clone()],
            Stage::Layer(i) => self.layers[i].parameters(),
            Stage::Head => vec![
                self.norm.weight.shallow_clone(),
                self.lm_head.shallow_clone(),
            ],
        }
    }

    /// A pass without rows through a model whose parameters `params` gathers: every stage of
    /// [`Qwen2::forward_right_padded_with`] gathered and released in its order, so that a
    /// data-parallel rank without work joins the gathers of ranks with some.
    pub fn idle_forward(&self, params: &mut dyn ParamGather) {
        for stage in self.forward_stages() {
            let next = (stage != Stage::Head).then(|| self.stage_after(stage));
            params.gather(stage, next);
            params.release(stage);
        }
    }

    /// Drops the fused projections of sampling (see [`FusedLayer`]), which hold the storage of
    /// most of each layer's weights: a model whose parameters are sharded (ZeRO-3) frees that
    /// storage. The next cached forward without autograd fuses again.
    pub fn drop_fused(&self) {
        let mut fused = self.fused.lock().unwrap_or_else(PoisonError::into_inner);
        for f in fused.iter_mut() {
            *f = FusedLayer::empty();
        }
    }

    /// Embeddings, every decoder layer under `pass` (on `fused` projections when given, with
    /// `cache` when given) and the final norm.
    fn run_layers(
        &self,
        input_ids: &Tensor,
        pass: &LayerPass,
        fused: Option<&[FusedLayer]>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let mut h = self.embed(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let projections = fused.map_or(Projections::Separate, |f| Projections::Fused(&f[i]));
            let layer_cache = cache.as_mut().map(|c| (&mut **c, i));
            h = layer.forward(&h, projections, pass, layer_cache);
        }
        self.norm.forward(&h)
    }

    /// The [`LayerPass`] of a forward at `position_ids` (`[B, T]`) under `mask`
    /// ([`attention_mask`]; `None`: causal without a mask): RoPE tables for fused projections
    /// when `fused`, and with `decode` (fused, with a mask) the decode step's key bias.
    pub(crate) fn layer_pass(
        &self,
        position_ids: &Tensor,
        mask: Option<Tensor>,
        fused: bool,
        decode: bool,
    ) -> LayerPass {
        let (c, kind) = (&self.config, self.compute_kind);
        if !fused {
            return LayerPass {
                mask,
                rope: self.rope.tables(position_ids, kind),
                decode_bias: None,
            };
        }
        let heads = c.num_attention_heads + c.num_kv_heads();
        let rope = self
            .rope
            .head_tables(position_ids, kind, heads, c.num_kv_heads());
        let decode_bias = mask
            .as_ref()
            .filter(|_| decode)
            .map(|mask| decode_bias(mask, c.num_kv_heads(), kind));
        LayerPass {
            mask,
            rope,
            decode_bias,
        }
    }

    /// Whether autograd is recording (tch does not expose the grad mode itself).
    fn grad_enabled(&self) -> bool {
        self.grad_probe.neg().requires_grad()
    }

    /// Handles to every layer's fused projections, fused again first for a layer whose
    /// variables no longer are their rows.
    fn fused_layers(&self) -> Vec<FusedLayer> {
        let mut fused = self.fused.lock().unwrap_or_else(PoisonError::into_inner);
        for (layer, f) in self.layers.iter().zip(fused.iter_mut()) {
            if !f.is_current(layer) {
                tracing::debug!("fusing a layer's projections again");
                *f = FusedLayer::new(layer);
            }
        }
        fused.iter().map(FusedLayer::shallow_clone).collect()
    }

    /// Logits `[.., V]` in f32 for hidden states `[.., D]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden
            .matmul(&self.lm_head.to_kind(hidden.kind()).transpose(0, 1))
            .to_kind(Kind::Float)
    }

    /// `[B, n]` f32: `log p(targets[b, i])` under the logits of final hidden states
    /// `hidden[b, i]` (`[B, n, D]`), one log-softmax over the vocabulary.
    pub fn target_logprobs(&self, hidden: &Tensor, targets: &Tensor) -> Tensor {
        self.logits(hidden)
            .log_softmax(-1, Kind::Float)
            .gather(-1, &targets.unsqueeze(-1), false)
            .squeeze_dim(-1)
    }

    /// Token embeddings `[B, T, D]` in the compute dtype.
    pub(crate) fn embed(&self, input_ids: &Tensor) -> Tensor {
        cast(
            &Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false),
            self.compute_kind,
        )
    }
}

/// The additive form (0 or -inf, `[B * kv_heads, 1, S]` in `kind`) of a decode step's key
/// mask `[B, 1, 1, S]` (true = attend), for [`Attention::decode_attention`].
fn decode_bias(mask: &Tensor, kv_heads: i64, kind: Kind) -> Tensor {
    let (b, s) = (mask.size()[0], mask.size()[3]);
    Tensor::zeros([b, 1, 1, s], (kind, mask.device()))
        .masked_fill(&mask.logical_not(), f64::NEG_INFINITY)
        .expand([b, kv_heads, 1, s], false)
        .reshape([b * kv_heads, 1, s])
}

/// Boolean attention mask `[B, 1, T, S]` (true = attend) for `T` queries at key slots
/// `offset..offset+T`: causal over real keys, plus each query's own slot.
pub(crate) fn attention_mask(key_mask: &Tensor, offset: i64, t: i64) -> Tensor {
    let s = key_mask.size()[1];
    if t == 1 && s == offset + 1 {
        // Decoding: one new (real) token in the last key slot attends to every real key.
        return key_mask.to_kind(Kind::Bool).view([-1, 1, 1, s]);
    }
    let device = key_mask.device();
    let key_slots = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
    let query_slots = (Tensor::arange(t, (Kind::Int64, device)) + offset).view([t, 1]);
    let causal = key_slots.le_tensor(&query_slots);
    let own = key_slots.eq_tensor(&query_slots);
    let real = key_mask.to_kind(Kind::Bool).view([-1, 1, 1, s]);
    causal
        .unsqueeze(0)
        .unsqueeze(0)
        .logical_and(&real)
        .logical_or(&own)
}
