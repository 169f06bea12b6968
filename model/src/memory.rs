//! Bytes on the device: what a Qwen2 holds while it trains, scores and samples, as pure
//! functions of its shape, so that a run can be planned before a GPU is touched
//! (`prime plan`, and the start-time checks of the learner and the actor).
//!
//! Every function returns [`Term`]s, each with its formula in the notation below, grouped
//! into [`Phase`]s: the tensors alive together at one moment of a pass. A pass's peak is its
//! largest phase. The formulas follow the code of this crate op by op (which tensors autograd
//! saves, which temporaries a statement keeps alive) and are checked against libtorch's
//! allocations in `model/tests/memory_measured.rs` (docs/memory.md, "Planned against
//! measured").
//!
//! Notation: `D` hidden, `L` layers, `H` query heads, `KV` key/value heads, `hd` head width,
//! `QD = H hd`, `KVD = KV hd`, `F` MLP width, `V` vocabulary; a batch of `b` rows padded to
//! `T` tokens, `N = b T`; `e` bytes per element of the compute dtype, `ep` of the stored
//! weights; `P` parameters, `Pl` one decoder layer's.
use serde::Serialize;
use tch::{Device, Kind};

use crate::config::Qwen2Config;

/// 2^30 bytes.
pub const GIB: u64 = 1 << 30;

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB as f64)
}

/// Which scaled-dot-product attention kernel libtorch runs for the model's masked attention
/// (prefill, training and log-prob forwards all pass a boolean mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKernel {
    /// The composite kernel: f32 scores and probabilities of every query against every key,
    /// `[b, H, T, T]`. CUDA runs it for a boolean mask with grouped-query attention (flash
    /// takes no mask, the memory-efficient kernel no GQA).
    Math,
    /// A fused kernel that keeps an f32 log-sum-exp per query instead of the probabilities:
    /// what libtorch's CPU backend runs for the same call.
    Flash,
}

impl AttentionKernel {
    /// The kernel of the model's masked attention on `device`.
    pub fn for_device(device: Device) -> Self {
        if device.is_cuda() {
            Self::Math
        } else {
            Self::Flash
        }
    }
}

/// Bytes per element of `kind`.
pub fn element_bytes(kind: Kind) -> u64 {
    kind.elt_size_in_bytes() as u64
}

/// Element sizes of a model on its device: stored weights (`ep`) and activations (`e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtypes {
    /// Bytes per stored weight.
    pub param: u64,
    /// Bytes per activation.
    pub compute: u64,
}

impl Dtypes {
    pub fn new(param: Kind, compute: Kind) -> Self {
        Self {
            param: element_bytes(param),
            compute: element_bytes(compute),
        }
    }
}

/// One amount of memory: what it is, how it is computed, how many bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Term {
    pub name: String,
    pub formula: String,
    pub bytes: u64,
}

impl Term {
    pub fn new(name: impl Into<String>, formula: impl Into<String>, bytes: u64) -> Self {
        Self {
            name: name.into(),
            formula: formula.into(),
            bytes,
        }
    }
}

/// Tensors alive together at one moment of a pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub name: String,
    pub terms: Vec<Term>,
}

impl Phase {
    fn new(name: impl Into<String>, terms: Vec<Term>) -> Self {
        Self {
            name: name.into(),
            terms: terms.into_iter().filter(|t| t.bytes > 0).collect(),
        }
    }

    /// Sum of the terms.
    pub fn bytes(&self) -> u64 {
        self.terms.iter().map(|t| t.bytes).sum()
    }
}

/// The largest of `phases` (the first of equals); `None` for none.
pub fn peak(phases: &[Phase]) -> Option<&Phase> {
    phases
        .iter()
        .reduce(|best, p| if p.bytes() > best.bytes() { p } else { best })
}

/// The shape counts the formulas use, from a model config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub d: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub f: u64,
    pub v: u64,
    pub tied: bool,
}

impl Dims {
    pub fn of(config: &Qwen2Config) -> Self {
        let u = |x: i64| x.max(0) as u64;
        Self {
            d: u(config.hidden_size),
            layers: u(config.num_hidden_layers),
            heads: u(config.num_attention_heads),
            kv_heads: u(config.num_kv_heads()),
            head_dim: u(config.head_dim()),
            f: u(config.intermediate_size),
            v: u(config.vocab_size),
            tied: config.tie_word_embeddings,
        }
    }

    /// `QD = H hd`, the width of the queries (and of the attention output).
    pub fn qd(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// `KVD = KV hd`, the width of the keys and of the values.
    pub fn kvd(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// `Pl`: one decoder layer's parameters (q/k/v with biases, o, gate/up/down, two norms).
    pub fn layer_parameters(&self) -> u64 {
        let (d, qd, kvd) = (self.d, self.qd(), self.kvd());
        d * qd + qd + 2 * (d * kvd + kvd) + qd * d + 3 * d * self.f + 2 * d
    }

    /// `V D`: the embedding matrix, and the LM head's when untied.
    pub fn vocab_matrix(&self) -> u64 {
        self.v * self.d
    }

    /// `P`: every parameter (`Qwen2Config::num_parameters`).
    pub fn parameters(&self) -> u64 {
        let head = if self.tied { 0 } else { self.vocab_matrix() };
        self.vocab_matrix() + self.layers * self.layer_parameters() + self.d + head
    }

    /// The largest unit a sharded model gathers at once: a decoder layer, the embedding or
    /// the LM head.
    pub fn largest_unit(&self) -> u64 {
        self.layer_parameters().max(self.vocab_matrix())
    }
}

/// A batch of `rows` sequences padded to `width` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Batch {
    pub rows: u64,
    pub width: u64,
}

impl Batch {
    /// `N = b T`.
    pub fn tokens(&self) -> u64 {
        self.rows * self.width
    }

    /// `b T^2`: one `[T, T]` matrix per row.
    fn squares(&self) -> u64 {
        self.rows * self.width * self.width
    }
}

/// Where a backward pass puts the parameter gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gradients {
    /// Added into each parameter's `.grad`, which persists (counted with the weights).
    Accumulate,
    /// Handed stage by stage to a sink as fresh tensors (ZeRO-2), never stored.
    Sink,
}

/// One micro-batch's forward and backward pass, as `Qwen2::token_logprobs_backward` (and
/// `_to`) runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingPass {
    pub dtypes: Dtypes,
    pub kernel: AttentionKernel,
    pub batch: Batch,
    /// Positions per chunk of the vocabulary projection (`learner.memory.logit_chunk_tokens`).
    pub logit_chunk: u64,
    /// Positions per row whose log-probs the loss takes: `T - 1` for every next token, the
    /// response width for the learner's plain path.
    pub logprob_positions: u64,
    /// Decoder layers recomputed in the backward pass (`recompute_activations`).
    pub recompute: bool,
    pub gradients: Gradients,
}

/// Bytes autograd saves for the backward pass of one decoder layer on `batch`.
///
/// - the two RMSNorms, `2 (8 D + 4) N`: per norm an f32 tensor of the input (its upcast, or in
///   f32 the normalised product), the `e`-byte normalised input and output (4 + 2 + 2 bytes
///   in bf16, 4 + 4 in f32) and the f32 statistic;
/// - the MLP, `4 e F N`: gate, its SiLU, up and their product;
/// - attention on the math kernel, `(12 + e) QD N + 4 H b T^2`: f32 copies of the scaled
///   queries and of the keys and values repeated to all `H` heads, the output the o_proj
///   saves, and the f32 probabilities;
/// - attention on the flash kernel, `(3 e QD + 2 e KVD + 4 H) N + e b T^2`: the rotated
///   queries and keys, the values, the output and its reshaped copy for the o_proj, the f32
///   log-sum-exp per query and head, and the mask in the compute dtype.
pub fn saved_layer(dims: &Dims, dtypes: Dtypes, kernel: AttentionKernel, batch: Batch) -> Term {
    let (e, n) = (dtypes.compute, batch.tokens());
    let (d, f, qd, kvd, h) = (dims.d, dims.f, dims.qd(), dims.kvd(), dims.heads);
    let common = 2 * (8 * d + 4) * n + 4 * e * f * n;
    match kernel {
        AttentionKernel::Math => Term::new(
            "one layer's saved activations",
            "(16 D + 8 + 4e F + (12 + e) QD) N + 4 H b T^2",
            common + (12 + e) * qd * n + 4 * h * batch.squares(),
        ),
        AttentionKernel::Flash => Term::new(
            "one layer's saved activations",
            "(16 D + 8 + 4e F + 3e QD + 2e KVD + 4 H) N + e b T^2",
            common + (3 * e * qd + 2 * e * kvd + 4 * h) * n + e * batch.squares(),
        ),
    }
}

/// A layer's backward transient on top of what it saved, the larger of two moments: the MLP
/// backward, where the gradients of the product's two factors exist together (`2 e F N`),
/// and the attention backward: on the math kernel the f32 gradients of the probabilities and
/// of the scores (`8 H b T^2`), on the flash kernel those of the queries, keys and values
/// (`e (QD + 2 KVD) N`).
fn layer_backward(dims: &Dims, e: u64, kernel: AttentionKernel, batch: Batch) -> Term {
    let mlp = Term::new(
        "MLP backward (gradients of gate and up)",
        "2 e F N",
        2 * e * dims.f * batch.tokens(),
    );
    let attention = match kernel {
        AttentionKernel::Math => Term::new(
            "attention backward: f32 gradients of probabilities, scores",
            "8 H b T^2",
            8 * dims.heads * batch.squares(),
        ),
        AttentionKernel::Flash => Term::new(
            "attention backward (gradients of q, k, v)",
            "e (QD + 2 KVD) N",
            e * (dims.qd() + 2 * dims.kvd()) * batch.tokens(),
        ),
    };
    if mlp.bytes > attention.bytes {
        mlp
    } else {
        attention
    }
}

/// `b T^2` bytes: the boolean `[b, 1, T, T]` mask every layer of a forward shares.
fn mask(batch: Batch) -> Term {
    Term::new("attention mask (bool)", "b T^2", batch.squares())
}

/// A chunk's fresh gradient of the LM head: `ep V D`, computed in the compute dtype first when
/// the weights are stored in another (`(e + ep) V D`).
fn fresh_head_gradient(dtypes: Dtypes, vd: u64) -> Term {
    if dtypes.compute == dtypes.param {
        Term::new("LM head gradient of one chunk", "ep V D", dtypes.param * vd)
    } else {
        Term::new(
            "LM head gradient of one chunk (computed, then cast)",
            "(e + ep) V D",
            (dtypes.compute + dtypes.param) * vd,
        )
    }
}

/// `c`: positions in one chunk of the vocabulary projection (never more than there are).
fn chunk_positions(chunk: u64, positions: u64) -> u64 {
    chunk.clamp(1, positions.max(1))
}

/// The phases of one training micro-batch ([`TrainingPass`]); the largest is its peak above
/// the weights (and, with [`Gradients::Accumulate`], above the `.grad` tensors).
///
/// With recomputation (`Qwen2::recompute_backward`), `L e D N` of saved layer inputs are held
/// until the layers are walked back, plus the final hidden states, the last layer's output
/// and the gradient at the hidden states (`3 e D N`) and the mask:
/// - head, log-softmax backward: one chunk's `12 V b c` (its saved f32 output, the gradient
///   arriving at it and the one it passes on), and with a sink the LM head's gradient summed
///   over the chunks so far, `ep V D`;
/// - head, weight gradient: the chunk's `e V b c` gradient of the logits, that sum, and the
///   chunk's fresh head gradient, `ep V D`;
/// - first layer walked back (all inputs still held): its saved activations, its output and
///   the gradient from above (`2 e D N`), its backward transient, and its parameter
///   gradients: all of them with a sink (`ep Pl`), two MLP matrices in flight when they are
///   accumulated (`2 ep D F`);
/// - embeddings: the dense `ep V D` gradient of the embedding matrix.
///
/// Without recomputation every layer's activations are saved (`L` times [`saved_layer`]) with
/// the f32 log-softmax output of every log-prob position, `4 V b p`; the head's backward then
/// adds `8 V b c` for the first chunk, and later the head gradient summed in autograd's buffer
/// next to a chunk's fresh one, `2 e V D`.
pub fn training_phases(dims: &Dims, pass: &TrainingPass) -> Vec<Phase> {
    let TrainingPass {
        dtypes,
        kernel,
        batch,
        logit_chunk,
        logprob_positions,
        recompute,
        gradients,
    } = *pass;
    let (e, ep, n) = (dtypes.compute, dtypes.param, batch.tokens());
    let (d, v, b) = (dims.d, dims.v, batch.rows);
    let c = chunk_positions(logit_chunk, logprob_positions);
    let vd = dims.vocab_matrix();
    let layer = saved_layer(dims, dtypes, kernel, batch);
    if recompute {
        let inputs = Term::new("saved layer inputs", "L e D N", dims.layers * e * d * n);
        // With a sink the head's gradient is summed over the chunks: from the second chunk
        // on the sum exists next to each chunk's fresh gradient. Accumulated, the sum is the
        // persistent `.grad` and only the fresh one is transient.
        let summed = gradients == Gradients::Sink && logprob_positions > c;
        let head_sum = Term::new(
            "LM head gradient summed over the chunks so far",
            "ep V D",
            if summed { ep * vd } else { 0 },
        );
        let held = vec![
            inputs.clone(),
            Term::new(
                "final hidden states and their gradient",
                "3 e D N",
                3 * e * d * n,
            ),
            mask(batch),
        ];
        let softmax = Phase::new(
            "training: LM head, log-softmax backward",
            [
                held.clone(),
                vec![
                    Term::new(
                        "logits chunk (f32 log-softmax backward)",
                        "12 V b c",
                        12 * v * b * c,
                    ),
                    head_sum.clone(),
                ],
            ]
            .concat(),
        );
        let head_gradient = Phase::new(
            "training: LM head, weight gradient",
            [
                held,
                vec![
                    Term::new("logits chunk gradient", "e V b c", e * v * b * c),
                    head_sum,
                    fresh_head_gradient(dtypes, vd),
                ],
            ]
            .concat(),
        );
        let layer_grads = match gradients {
            Gradients::Sink => Term::new(
                "one layer's parameter gradients",
                "ep Pl",
                ep * dims.layer_parameters(),
            ),
            Gradients::Accumulate => Term::new(
                "parameter gradients in flight",
                "2 ep D F",
                2 * ep * d * dims.f,
            ),
        };
        let walked = Phase::new(
            "training: recomputed layer backward",
            vec![
                inputs,
                Term::new(
                    "layer output and the gradient from above",
                    "2 e D N",
                    2 * e * d * n,
                ),
                mask(batch),
                layer,
                layer_backward(dims, e, kernel, batch),
                layer_grads,
            ],
        );
        let embeddings = Phase::new(
            "training: embedding backward",
            vec![
                Term::new("embedding gradient (dense)", "ep V D", ep * vd),
                Term::new("hidden gradient", "2 e D N", 2 * e * d * n),
            ],
        );
        return vec![softmax, head_gradient, walked, embeddings];
    }
    let saved = Term::new(
        "every layer's saved activations",
        format!("L x ({})", layer.formula),
        dims.layers * layer.bytes,
    );
    let outputs = Term::new(
        "saved f32 log-softmax outputs",
        "4 V b p",
        4 * v * b * logprob_positions,
    );
    let hidden = Term::new("final hidden states", "2 e D N", 2 * e * d * n);
    let first_chunk = Phase::new(
        "training: LM head backward, first chunk",
        vec![
            saved.clone(),
            hidden.clone(),
            mask(batch),
            outputs.clone(),
            Term::new(
                "logits chunk (log-softmax gradients)",
                "8 V b c",
                8 * v * b * c,
            ),
        ],
    );
    let later_chunk = Phase::new(
        "training: LM head backward, gradient summed",
        vec![
            saved.clone(),
            hidden.clone(),
            mask(batch),
            Term::new(
                "saved f32 log-softmax outputs but one chunk",
                "4 V b (p - c)",
                4 * v * b * logprob_positions.saturating_sub(c),
            ),
            Term::new("logits chunk gradient", "e V b c", e * v * b * c),
            Term::new(
                "LM head gradient: the sum and a fresh one",
                "2 e V D",
                2 * e * vd,
            ),
        ],
    );
    let layers = Phase::new(
        "training: layer backward",
        vec![
            saved,
            hidden,
            mask(batch),
            layer_backward(dims, e, kernel, batch),
            Term::new(
                "parameter gradients in flight",
                "2 ep D F",
                2 * ep * d * dims.f,
            ),
        ],
    );
    vec![first_chunk, later_chunk, layers]
}

/// The phases of a forward without autograd (`token_logprobs` in no-grad mode: the
/// reference, the old log-probs, the PRM server), `p` log-prob positions per row.
///
/// - a layer: its input, normalised input and residual (`3 e D N`), q/k/v and the rotated
///   q/k (`e (2 QD + 3 KVD) N`) and the kernel: on the math kernel f32 copies of q, k, v and
///   of the output (`16 QD N`) with the f32 scores, probabilities and the boolean of masked
///   scores of its safe softmax (`9 H b T^2`); on the flash kernel the output and its copy
///   for the o_proj (`2 e QD N`) and the mask in the compute dtype (`e b T^2`);
/// - the head: the hidden states and one chunk's f32 logits and log-softmax, `8 V b c`.
pub fn frozen_phases(
    dims: &Dims,
    dtypes: Dtypes,
    kernel: AttentionKernel,
    batch: Batch,
    logit_chunk: u64,
    logprob_positions: u64,
) -> Vec<Phase> {
    let (e, n) = (dtypes.compute, batch.tokens());
    let (d, qd, kvd, h) = (dims.d, dims.qd(), dims.kvd(), dims.heads);
    let c = chunk_positions(logit_chunk, logprob_positions);
    let attention = match kernel {
        AttentionKernel::Math => Term::new(
            "math attention: f32 q, k, v, output, scores, probabilities",
            "16 QD N + 9 H b T^2",
            16 * qd * n + 9 * h * batch.squares(),
        ),
        AttentionKernel::Flash => Term::new(
            "flash attention (output and its copy; mask)",
            "2 e QD N + e b T^2",
            2 * e * qd * n + e * batch.squares(),
        ),
    };
    let layer = Phase::new(
        "forward: a layer",
        vec![
            Term::new(
                "layer input, normalised input, residual",
                "3 e D N",
                3 * e * d * n,
            ),
            Term::new(
                "q, k, v and rotated q, k",
                "e (2 QD + 3 KVD) N",
                e * (2 * qd + 3 * kvd) * n,
            ),
            mask(batch),
            attention,
        ],
    );
    let head = Phase::new(
        "forward: LM head",
        vec![
            Term::new("hidden states", "2 e D N", 2 * e * d * n),
            mask(batch),
            Term::new(
                "logits chunk (f32 logits and log-softmax)",
                "8 V b c",
                8 * dims.v * batch.rows * c,
            ),
        ],
    );
    vec![layer, head]
}

/// One `generate_batched` call: `rows` sequences decoding at once, from `groups` distinct
/// prompts (the K samples of a prompt share one prefill) of up to `prompt` tokens, each
/// generating up to `max_new` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sampling {
    pub rows: u64,
    pub groups: u64,
    pub prompt: u64,
    pub max_new: u64,
}

/// The KV cache the sampler preallocates: `2 L R (P + M) KVD e` bytes, keys and values of
/// every layer for `R` rows of prompt plus new tokens.
pub fn kv_cache(dims: &Dims, e: u64, sampling: Sampling) -> Term {
    let columns = sampling.prompt + sampling.max_new;
    Term::new(
        format!(
            "KV cache ({} rows x {} positions, preallocated)",
            sampling.rows, columns
        ),
        "2 L R (P + M) KVD e",
        2 * dims.layers * sampling.rows * columns * dims.kvd() * e,
    )
}

/// The phases of a sampling call ([`Sampling`]) next to its `kv` cache (the preallocated
/// [`kv_cache`], or a budget standing in for it).
///
/// - prefill of `G` prompts of `P` tokens (`Np = G P`), left-padded and run in one forward
///   on the fused projections: its own KV cache (`2 L KVD e Np`), the RoPE tables for the
///   fused heads (`2 e (QD + 2 KVD) Np`), the mask; in a layer the input and its norm
///   (`2 e D Np`), the q/k/v projection and its rotation (`2 e (QD + 2 KVD) Np`), the output
///   and its copy for the o_proj (`2 e QD Np`), and the kernel's own: math `16 QD Np +
///   9 H G P^2`, flash `e G P^2`;
/// - a decode step's sampling: `R` rows of f32 logits, log-softmax and probabilities, and
///   the probabilities in f64 with their cumulative sum, `28 V R`, and one layer's scores over `P + M` keys,
///   `(2 e + 4) H R (P + M)`.
pub fn sampling_phases(
    dims: &Dims,
    e: u64,
    kernel: AttentionKernel,
    sampling: Sampling,
    kv: Term,
) -> Vec<Phase> {
    let Sampling {
        rows,
        groups,
        prompt,
        max_new,
    } = sampling;
    let (d, qd, kvd, h) = (dims.d, dims.qd(), dims.kvd(), dims.heads);
    let np = groups * prompt;
    let qkv = qd + 2 * kvd;
    let squares = groups * prompt * prompt;
    let attention = match kernel {
        AttentionKernel::Math => Term::new(
            "math attention: f32 q, k, v, output, scores, probabilities",
            "16 QD Np + 9 H G P^2",
            16 * qd * np + 9 * h * squares,
        ),
        AttentionKernel::Flash => Term::new("flash attention mask", "e G P^2", e * squares),
    };
    let prefill = Phase::new(
        format!("sampling: prefill of {groups} prompts x {prompt} tokens"),
        vec![
            kv.clone(),
            Term::new(
                "prefill KV cache",
                "2 L KVD e Np",
                2 * dims.layers * kvd * e * np,
            ),
            Term::new("RoPE tables", "2 e (QD + 2 KVD) Np", 2 * e * qkv * np),
            Term::new("attention mask (bool)", "G P^2", squares),
            Term::new("layer input and its norm", "2 e D Np", 2 * e * d * np),
            Term::new(
                "q/k/v and their rotation",
                "2 e (QD + 2 KVD) Np",
                2 * e * qkv * np,
            ),
            Term::new(
                "attention output and its copy",
                "2 e QD Np",
                2 * e * qd * np,
            ),
            attention,
        ],
    );
    let columns = prompt + max_new;
    let decode = Phase::new(
        format!("sampling: decode step of {rows} rows"),
        vec![
            kv,
            Term::new(
                "sampling: f32 logits, log-softmax, probabilities; f64 cdf",
                "28 V R",
                28 * dims.v * rows,
            ),
            Term::new(
                "decode attention scores",
                "(2 e + 4) H R (P + M)",
                (2 * e + 4) * h * rows * columns,
            ),
        ],
    );
    vec![prefill, decode]
}

/// What a process needs besides its tensors: the CUDA context and its kernels, cuBLAS
/// workspaces and NCCL buffers (1 GiB), and the caching allocator's fragmentation (5% of the
/// planned tensor bytes).
pub fn framework_reserve(tensor_bytes: u64) -> Term {
    Term::new(
        "reserve: CUDA context, workspaces, NCCL, fragmentation",
        "1 GiB + 5% of the tensors",
        GIB + tensor_bytes / 20,
    )
}

/// A role's memory on one device: what stays resident, the transient phases, the reserve,
/// and what to change when it does not fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolePlan {
    /// Which process: `learner rank`, `actor`, `prm-server`.
    pub role: String,
    /// The settings planned, in one line.
    pub setup: String,
    /// Held for the life of the process.
    pub resident: Vec<Term>,
    /// Transients, one at a time; the largest counts.
    pub phases: Vec<Phase>,
    /// Bytes of the device.
    pub device_bytes: u64,
    /// Keys or flags to change, when it does not fit (filled by the caller).
    pub changes: Vec<String>,
    /// Assumptions the reader should know.
    pub notes: Vec<String>,
}

impl RolePlan {
    /// Sum of the resident terms.
    pub fn resident_bytes(&self) -> u64 {
        self.resident.iter().map(|t| t.bytes).sum()
    }

    /// The largest phase.
    pub fn peak_phase(&self) -> Option<&Phase> {
        peak(&self.phases)
    }

    /// The reserve for this plan's tensors.
    pub fn reserve(&self) -> Term {
        framework_reserve(self.tensor_bytes())
    }

    /// Resident plus the largest phase.
    pub fn tensor_bytes(&self) -> u64 {
        self.resident_bytes() + self.peak_phase().map_or(0, Phase::bytes)
    }

    /// Tensors plus the reserve: what the device must hold.
    pub fn total_bytes(&self) -> u64 {
        self.tensor_bytes() + self.reserve().bytes
    }

    pub fn fits(&self) -> bool {
        self.total_bytes() <= self.device_bytes
    }

    /// One line: the total against the device and the verdict.
    pub fn verdict(&self) -> String {
        format!(
            "{}: {} GiB of {} GiB: {}",
            self.role,
            gib(self.total_bytes()),
            gib(self.device_bytes),
            if self.fits() { "fits" } else { "does not fit" }
        )
    }

    /// The plan as a table: resident terms, every phase, the reserve, the verdict, the
    /// changes and the notes.
    pub fn render(&self) -> String {
        let mut out = format!("{} ({})\n", self.role, self.setup);
        let row = |out: &mut String, name: &str, formula: &str, bytes: u64| {
            out.push_str(&format!("  {name:<62} {formula:<50} {:>8}\n", gib(bytes)));
        };
        out.push_str(&format!(
            "  {:<62} {:<50} {:>8}\n",
            "resident", "formula", "GiB"
        ));
        for t in &self.resident {
            row(&mut out, &t.name, &t.formula, t.bytes);
        }
        row(&mut out, "= resident", "", self.resident_bytes());
        let peak_name = self.peak_phase().map(|p| p.name.clone());
        for phase in &self.phases {
            let mark = if Some(&phase.name) == peak_name.as_ref() {
                " (largest)"
            } else {
                ""
            };
            out.push_str(&format!("  phase {}{mark}\n", phase.name));
            for t in &phase.terms {
                row(&mut out, &format!("  {}", t.name), &t.formula, t.bytes);
            }
            row(&mut out, "  = phase", "", phase.bytes());
        }
        let reserve = self.reserve();
        row(&mut out, &reserve.name, &reserve.formula, reserve.bytes);
        out.push_str(&format!(
            "  => resident + largest phase + reserve = {}\n",
            self.verdict()
        ));
        for change in &self.changes {
            out.push_str(&format!("  change: {change}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        out
    }
}

/// What a process does with its plan at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It fits: go on.
    Fits,
    /// It does not fit but `--force` was given: go on, warning with this message.
    Forced(String),
    /// It does not fit: stop with this message (the numbers and what to change).
    Refused(String),
}

/// Whether a process starts with `plan`: it fits, it is forced through, or it is refused with
/// the numbers, the largest phase and the keys to change.
pub fn decide(plan: &RolePlan, force: bool) -> Decision {
    if plan.fits() {
        return Decision::Fits;
    }
    let peak = plan
        .peak_phase()
        .map(|p| format!("; largest phase {}: {} GiB", p.name, gib(p.bytes())))
        .unwrap_or_default();
    let changes = if plan.changes.is_empty() {
        String::new()
    } else {
        format!("; change: {}", plan.changes.join("; "))
    };
    let message = format!(
        "{} (resident {} GiB{peak}; reserve {} GiB){changes}. `prime plan` shows every term",
        plan.verdict(),
        gib(plan.resident_bytes()),
        gib(plan.reserve().bytes),
    );
    if force {
        Decision::Forced(message)
    } else {
        Decision::Refused(format!("{message}; --force starts anyway"))
    }
}

/// An actor's plan ([`actor_plan`]): what it samples and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActorSetup {
    /// Prompts per batch (`prime actor run --max-prompts`).
    pub prompts: u64,
    /// Samples per prompt, K.
    pub samples: u64,
    /// Longest prompt, in tokens.
    pub prompt: u64,
    /// Longest response, in tokens.
    pub max_new: u64,
    /// Bytes per weight and activation (bf16 on CUDA).
    pub dtype: Kind,
    pub kernel: AttentionKernel,
    /// Bytes of the device.
    pub device_bytes: u64,
}

impl ActorSetup {
    fn sampling(&self) -> Sampling {
        Sampling {
            rows: self.prompts * self.samples,
            groups: self.prompts,
            prompt: self.prompt,
            max_new: self.max_new,
        }
    }
}

/// A rollout actor: the policy's weights, and one batch of `prompts x samples` rows sampled
/// at once over the preallocated KV cache. When it does not fit, the largest
/// `--max-prompts` that does is named.
pub fn actor_plan(config: &Qwen2Config, setup: &ActorSetup) -> RolePlan {
    let mut plan = actor_terms(config, setup);
    if !plan.fits() {
        let fitting = (1..setup.prompts)
            .rev()
            .find(|&prompts| actor_terms(config, &ActorSetup { prompts, ..*setup }).fits());
        plan.changes.push(match fitting {
            Some(n) => format!(
                "prime actor run --max-prompts {n} (the chart's actors.maxPrompts): the most \
                 prompts whose batch fits"
            ),
            None => "not even one prompt's batch fits: a larger GPU, or shorter responses \
                     (learner.rollout.max_response_tokens)"
                .into(),
        });
    }
    plan
}

/// [`actor_plan`] without the search for what fits.
fn actor_terms(config: &Qwen2Config, setup: &ActorSetup) -> RolePlan {
    let dims = Dims::of(config);
    let e = element_bytes(setup.dtype);
    let sampling = setup.sampling();
    let kv = kv_cache(&dims, e, sampling);
    RolePlan {
        role: "actor".into(),
        setup: format!(
            "{} prompts x {} samples, prompts up to {} + {} new tokens, {:?}",
            setup.prompts, setup.samples, setup.prompt, setup.max_new, setup.dtype
        ),
        resident: vec![Term::new("policy weights", "e P", e * dims.parameters())],
        phases: sampling_phases(&dims, e, setup.kernel, sampling, kv),
        device_bytes: setup.device_bytes,
        changes: Vec::new(),
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen7b() -> Qwen2Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": false,
        }))
        .unwrap()
    }

    #[test]
    fn parameter_counts_agree_with_the_config() {
        let config = qwen7b();
        let dims = Dims::of(&config);
        assert_eq!(dims.parameters(), config.num_parameters() as u64);
        assert_eq!(dims.parameters(), 7_615_616_512);
        assert_eq!(dims.layer_parameters(), 233_057_792);
        assert_eq!(dims.largest_unit(), 152_064 * 3584);
    }

    /// docs/memory.md's hand count for 7B at T = 4096: `(30 D + 8 F + 8) T + 4 H T^2`.
    #[test]
    fn a_saved_layer_matches_the_hand_count() {
        let dims = Dims::of(&qwen7b());
        let bf16 = Dtypes::new(Kind::BFloat16, Kind::BFloat16);
        let one = Batch {
            rows: 1,
            width: 4096,
        };
        let saved = saved_layer(&dims, bf16, AttentionKernel::Math, one);
        assert_eq!(saved.bytes, 259_080 * 4096 + 112 * 4096 * 4096);
    }

    /// The sampler's cache for 64 prompts x 4 samples at 1,024 + 3,072 tokens (7B): 56 GiB.
    #[test]
    fn the_kv_cache_of_an_actor_batch() {
        let dims = Dims::of(&qwen7b());
        let sampling = Sampling {
            rows: 256,
            groups: 64,
            prompt: 1024,
            max_new: 3072,
        };
        let kv = kv_cache(&dims, 2, sampling);
        assert_eq!(kv.bytes, 2 * 28 * 256 * 4096 * 512 * 2);
        assert_eq!(gib(kv.bytes), "56.00");
    }

    fn plan_of(resident: u64, phase: u64, device: u64) -> RolePlan {
        RolePlan {
            role: "actor".into(),
            setup: String::new(),
            resident: vec![Term::new("weights", "e P", resident)],
            phases: vec![
                Phase::new("small", vec![Term::new("a", "", phase / 2)]),
                Phase::new("large", vec![Term::new("b", "", phase)]),
            ],
            device_bytes: device,
            changes: vec!["prime actor run --max-prompts 8".into()],
            notes: Vec::new(),
        }
    }

    #[test]
    fn the_total_is_resident_plus_the_largest_phase_plus_the_reserve() {
        let plan = plan_of(10 * GIB, 20 * GIB, 80 * GIB);
        assert_eq!(plan.peak_phase().unwrap().name, "large");
        assert_eq!(plan.tensor_bytes(), 30 * GIB);
        assert_eq!(plan.reserve().bytes, GIB + 30 * GIB / 20);
        assert_eq!(plan.total_bytes(), 31 * GIB + 30 * GIB / 20);
        assert!(plan.fits());
    }

    #[test]
    fn a_plan_that_fits_starts_and_one_that_does_not_is_refused_unless_forced() {
        assert_eq!(
            decide(&plan_of(10 * GIB, 20 * GIB, 80 * GIB), false),
            Decision::Fits
        );
        // 60 + 25 + (1 + 4.25) GiB > 80 GiB.
        let over = plan_of(60 * GIB, 25 * GIB, 80 * GIB);
        let Decision::Refused(message) = decide(&over, false) else {
            panic!("refused expected");
        };
        assert!(
            message.contains("90.25 GiB of 80.00 GiB: does not fit"),
            "{message}"
        );
        assert!(message.contains("resident 60.00 GiB"), "{message}");
        assert!(
            message.contains("largest phase large: 25.00 GiB"),
            "{message}"
        );
        assert!(message.contains("--max-prompts 8"), "{message}");
        assert!(message.contains("--force"), "{message}");
        let Decision::Forced(warning) = decide(&over, true) else {
            panic!("forced expected");
        };
        assert!(warning.contains("does not fit"), "{warning}");
        // Exactly full fits.
        let full = plan_of(60 * GIB, 10 * GIB, 0);
        let exact = RolePlan {
            device_bytes: full.total_bytes(),
            ..full
        };
        assert_eq!(decide(&exact, false), Decision::Fits);
    }

    #[test]
    fn an_actor_that_does_not_fit_is_told_how_many_prompts_do() {
        let setup = ActorSetup {
            prompts: 64,
            samples: 4,
            prompt: 1024,
            max_new: 3072,
            dtype: Kind::BFloat16,
            kernel: AttentionKernel::Math,
            device_bytes: 79 * GIB,
        };
        let plan = actor_plan(&qwen7b(), &setup);
        assert!(!plan.fits());
        let change = &plan.changes[0];
        let n: u64 = change
            .strip_prefix("prime actor run --max-prompts ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{change}"));
        let at = |prompts| actor_plan(&qwen7b(), &ActorSetup { prompts, ..setup }).fits();
        assert!(at(n) && !at(n + 1), "{n}");
    }
}
