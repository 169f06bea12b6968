//! Training on a [`Qwen2`]: backward passes that trade compute for memory.
//!
//! [`Qwen2::backward_with_recompute`]: tch has no `torch.utils.checkpoint`, so the decoder is
//! run once without autograd, keeping only each layer's input, and every layer is run again
//! with autograd during the backward pass. [`Qwen2::token_logprobs_backward`] computes
//! per-token log-probs with a backward pass for a loss over them, plainly or with that
//! recomputation (and the vocabulary projection chunked in both directions).
//! [`Qwen2::token_logprobs_backward_to`] recomputes too but hands each stage's parameter
//! gradients to a [`GradSink`] instead of accumulating them (ZeRO-2 data parallelism), and
//! gathers each stage's parameters through it just before the stage runs (ZeRO-3, where
//! every rank holds a shard of the parameters: see [`ParamGather`]).
use tch::{Kind, Tensor};

use crate::logprobs::{token_logprobs, PaddedBatch};
use crate::qwen2::{attention_mask, Projections, Qwen2};

impl Qwen2 {
    /// Backward pass with activation recomputation per decoder layer: the gradients it
    /// accumulates into the parameters equal those of a plain forward and backward, while the
    /// activations alive at once are each layer's input (`[B, T, D]` per layer) plus one
    /// layer's autograd graph, instead of every layer's graph. Costs one more forward.
    ///
    /// The arguments are those of [`Qwen2::forward`] without a cache. `head` gets the final
    /// hidden states (after the final norm, `[B, T, D]`) as a leaf that requires grad; it must
    /// call `backward` on a loss that depends on them, so that their `grad()` holds
    /// d loss / d hidden (the LM head's gradient accumulates on the way). Its result is
    /// returned. Runs with autograd whatever the caller's grad mode.
    pub fn backward_with_recompute<R>(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: &Tensor,
        head: impl FnOnce(&Tensor) -> R,
    ) -> R {
        self.recompute_backward(
            input_ids,
            position_ids,
            Some(key_mask),
            GradTarget::Accumulate,
            |hidden, _, _| {
                let result = head(hidden);
                (result, hidden.grad())
            },
        )
    }

    /// The trainable parameters grouped in the stages a recomputing backward pass walks, in
    /// its order: the LM head, the final norm, the decoder layers from the last to the first,
    /// the embeddings. [`Qwen2::token_logprobs_backward_to`] hands a [`GradSink`] one call per
    /// stage with these parameters; with tied embeddings the first and the last stage hold the
    /// same variable and its two gradients add up. Parameters that do not require grad are
    /// left out (a stage may be empty).
    pub fn gradient_stages(&self) -> Vec<Vec<Tensor>> {
        let trainable = |params: Vec<Tensor>| -> Vec<Tensor> {
            params.into_iter().filter(Tensor::requires_grad).collect()
        };
        let mut stages = vec![
            trainable(vec![self.lm_head.shallow_clone()]),
            trainable(vec![self.norm.weight.shallow_clone()]),
        ];
        stages.extend(self.layers.iter().rev().map(|l| trainable(l.parameters())));
        stages.push(trainable(vec![self.embed_tokens.shallow_clone()]));
        stages
    }

    /// The recomputing backward pass behind [`Qwen2::backward_with_recompute`] and the
    /// recompute path of the log-prob backwards. `head(hidden, head_params, target)` gets the
    /// final hidden states as a leaf and returns its result and d loss / d hidden (undefined:
    /// no gradient reaches the model); every later stage of [`Qwen2::gradient_stages`] is
    /// recomputed and its parameter gradients go to `target`. Without a `key_mask` the batch
    /// is right-padded and attention is causal without a mask, as in
    /// [`Qwen2::forward_right_padded`].
    fn recompute_backward<'s, R>(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        key_mask: Option<&Tensor>,
        mut target: GradTarget<'s>,
        head: impl FnOnce(&Tensor, &[Tensor], &mut GradTarget<'s>) -> (R, Tensor),
    ) -> R {
        let t = input_ids.size()[1];
        let last_layer = self.layers.len().checked_sub(1).map(Stage::Layer);
        let (pass, mut layer_inputs, last, hidden) = tch::no_grad(|| {
            let mask = key_mask.map(|key_mask| attention_mask(key_mask, 0, t));
            let pass = self.layer_pass(position_ids, mask, false, false);
            let mut layer_inputs = Vec::with_capacity(self.layers.len());
            let h = self.gathered_layers(input_ids, &pass, &mut target, |input| {
                layer_inputs.push(input)
            });
            // The head stays gathered through the head's and the final norm's backward.
            target.gather(Stage::Head, last_layer);
            let hidden = self.norm.forward(&h);
            (pass, layer_inputs, h, hidden)
        });
        let mut stages = self.gradient_stages().into_iter();
        tch::with_grad(|| {
            let hidden = hidden.set_requires_grad(true);
            let head_params = stages.next().unwrap_or_default();
            let (result, grad) = head(&hidden, &head_params, &mut target);
            // Without a gradient no stage is recomputed, but a sink still sees every stage
            // and every gather, so that data-parallel ranks stay in step.
            let mut grad = grad.defined().then_some(grad);
            let norm_params = stages.next().unwrap_or_default();
            grad = backward_through(&mut target, &last, grad, &norm_params, |x| {
                self.norm.forward(x)
            });
            drop(last);
            target.release(Stage::Head);
            // Last layer first; each saved input is freed once its layer is done.
            while let Some(input) = layer_inputs.pop() {
                let i = layer_inputs.len();
                let layer = &self.layers[i];
                let params = stages.next().unwrap_or_default();
                target.gather(Stage::Layer(i), Some(stage_before(i)));
                grad = backward_through(&mut target, &input, grad, &params, |x| {
                    layer.forward(x, Projections::Separate, &pass, None)
                });
                target.release(Stage::Layer(i));
            }
            // A tied LM head is the same variable: this adds to the gradient `head` left there.
            let params = stages.next().unwrap_or_default();
            target.gather(Stage::Embedding, None);
            let embeddings = grad.as_ref().map(|_| self.embed(input_ids));
            match (embeddings, grad) {
                (Some(embeddings), Some(grad)) if embeddings.requires_grad() => {
                    let root = (embeddings * grad).sum(Kind::Float);
                    let (_, grads) = target.run(&root, &[], &params);
                    target.hand_over(&params, grads);
                }
                _ => target.skip(&params),
            }
            target.release(Stage::Embedding);
            result
        })
    }

    /// A recomputing backward pass without rows, for a data-parallel rank with fewer
    /// micro-batches than another: `sink` sees what [`Qwen2::token_logprobs_backward_to`]
    /// shows it, in the same order (every gather and release, every stage, with no
    /// gradients), so that the rank joins the others' collectives.
    pub fn idle_backward_to(&self, sink: &mut dyn GradSink) {
        let mut target = GradTarget::Sink(sink);
        let forward = self.forward_stages();
        for &stage in &forward[..forward.len() - 1] {
            target.gather(stage, Some(self.stage_after(stage)));
            target.release(stage);
        }
        target.gather(
            Stage::Head,
            self.layers.len().checked_sub(1).map(Stage::Layer),
        );
        let mut stages = self.gradient_stages().into_iter();
        // The LM head's stage, then the final norm's.
        for _ in 0..2 {
            target.skip(&stages.next().unwrap_or_default());
        }
        target.release(Stage::Head);
        for i in (0..self.layers.len()).rev() {
            target.gather(Stage::Layer(i), Some(stage_before(i)));
            target.skip(&stages.next().unwrap_or_default());
            target.release(Stage::Layer(i));
        }
        target.gather(Stage::Embedding, None);
        target.skip(&stages.next().unwrap_or_default());
        target.release(Stage::Embedding);
    }

    /// Per-token log-probs of `batch` with a backward pass for `loss_fn`: gradients of
    /// `loss_fn(logprobs)` accumulate into the parameters. `logprobs` is `[B, T-1]` f32 as
    /// [`token_logprobs`] computes it (entry `t-1` is `log p(ids[t] | ids[<t])`, padding
    /// entries included: the loss must mask them), and the loss must depend on the model only
    /// through it.
    ///
    /// `recompute: false` is a plain forward and backward. `recompute: true` recomputes each
    /// decoder layer during the backward pass ([`Qwen2::backward_with_recompute`]) and runs
    /// the vocabulary projection `chunk_tokens` positions at a time in both directions, so
    /// at most one chunk's `[B, chunk, V]` logits is alive (the plain path keeps all of them
    /// for its backward). The gradients are the same either way.
    pub fn token_logprobs_backward(
        &self,
        batch: &PaddedBatch,
        chunk_tokens: i64,
        recompute: bool,
        loss_fn: impl FnOnce(&Tensor) -> Tensor,
    ) -> LogprobsBackward {
        if !recompute {
            return tch::with_grad(|| {
                let logprobs = token_logprobs(self, batch, chunk_tokens);
                let loss = loss_fn(&logprobs);
                loss.backward();
                LogprobsBackward {
                    logprobs: logprobs.detach(),
                    loss: loss.detach(),
                }
            });
        }
        self.recomputed_logprobs_backward(batch, chunk_tokens, GradTarget::Accumulate, loss_fn)
    }

    /// [`Qwen2::token_logprobs_backward`] with recomputation, except that no parameter's
    /// `.grad` is touched: each stage's parameter gradients (see [`Qwen2::gradient_stages`])
    /// are computed as fresh tensors and handed to `sink` right after that stage, so at most
    /// one stage's gradients exist at a time (the LM head's are summed over the log-prob
    /// chunks first). The sink gets every stage once, in order, on every call.
    pub fn token_logprobs_backward_to(
        &self,
        batch: &PaddedBatch,
        chunk_tokens: i64,
        sink: &mut dyn GradSink,
        loss_fn: impl FnOnce(&Tensor) -> Tensor,
    ) -> LogprobsBackward {
        self.recomputed_logprobs_backward(batch, chunk_tokens, GradTarget::Sink(sink), loss_fn)
    }

    fn recomputed_logprobs_backward(
        &self,
        batch: &PaddedBatch,
        chunk_tokens: i64,
        target: GradTarget<'_>,
        loss_fn: impl FnOnce(&Tensor) -> Tensor,
    ) -> LogprobsBackward {
        let t = batch.input_ids.size()[1];
        let targets = batch.input_ids.narrow(1, 1, t - 1);
        let chunk = chunk_tokens.max(1);
        let chunks: Vec<(i64, i64)> = (0..t - 1)
            .step_by(chunk as usize)
            .map(|start| (start, chunk.min(t - 1 - start)))
            .collect();
        self.recompute_backward(
            &batch.input_ids,
            &batch.position_ids(),
            None,
            target,
            |hidden, head_params, target| {
                let piece = |h: &Tensor, (start, len): (i64, i64)| {
                    self.target_logprobs(h, &targets.narrow(1, start, len))
                };
                // The loss sees log-probs computed without autograd, then each chunk's
                // vocabulary projection runs again with autograd to carry d loss / d logprobs
                // back to the hidden states and the LM head.
                let logprobs = tch::no_grad(|| {
                    let pieces: Vec<Tensor> = chunks
                        .iter()
                        .map(|&(start, len)| piece(&hidden.narrow(1, start, len), (start, len)))
                        .collect();
                    Tensor::cat(&pieces, 1)
                })
                .set_requires_grad(true);
                let loss = loss_fn(&logprobs);
                let (mut grads, _) = target.run(&loss, &[&logprobs], &[]);
                let grad = grads.remove(0);
                let mut grad_hidden = Tensor::new();
                let mut head_grads: Vec<Tensor> =
                    head_params.iter().map(|_| Tensor::new()).collect();
                if grad.defined() {
                    grad_hidden = hidden.zeros_like();
                    for &(start, len) in &chunks {
                        let leaf = hidden
                            .narrow(1, start, len)
                            .detach()
                            .set_requires_grad(true);
                        let root = (piece(&leaf, (start, len)) * grad.narrow(1, start, len))
                            .sum(Kind::Float);
                        let (leaf_grad, param_grads) = target.run(&root, &[&leaf], head_params);
                        grad_hidden.narrow(1, start, len).copy_(&leaf_grad[0]);
                        // Summed in place: the head's gradient exists twice at most.
                        for (total, g) in head_grads.iter_mut().zip(param_grads) {
                            if !total.defined() {
                                *total = g;
                            } else if g.defined() {
                                let _ = total.g_add_(&g);
                            }
                        }
                    }
                }
                target.hand_over(head_params, head_grads);
                let out = LogprobsBackward {
                    logprobs: logprobs.detach(),
                    loss: loss.detach(),
                };
                (out, grad_hidden)
            },
        )
    }
}

/// What [`Qwen2::token_logprobs_backward`] returns; both tensors are detached.
#[derive(Debug)]
pub struct LogprobsBackward {
    /// `[B, T-1]` f32 token log-probs.
    pub logprobs: Tensor,
    /// The scalar loss.
    pub loss: Tensor,
}

/// Receives parameter gradients from [`Qwen2::token_logprobs_backward_to`], one call per
/// stage of [`Qwen2::gradient_stages`]: `grads[i]` is d loss / d `params[i]` from this pass
/// (in the parameter's dtype), undefined when the loss does not reach it. The tensors are the
/// sink's to keep or drop. A sink cannot stop the pass: one that fails records its error.
///
/// A sink is also where the pass gets the parameters of each stage ([`ParamGather`]): its
/// gathers come around the stage's recomputation, and a stage's gradients are handed over
/// before it is released.
pub trait GradSink: ParamGather {
    /// Takes one stage's gradients.
    fn accept(&mut self, params: &[Tensor], grads: Vec<Tensor>);
}

impl<F: FnMut(&[Tensor], Vec<Tensor>)> GradSink for F {
    fn accept(&mut self, params: &[Tensor], grads: Vec<Tensor>) {
        self(params, grads)
    }
}

/// Where a recomputing backward pass puts parameter gradients.
enum GradTarget<'s> {
    /// Into each parameter's `.grad`, as `backward` does.
    Accumulate,
    /// Handed to a sink stage by stage, never stored in `.grad`.
    Sink(&'s mut dyn GradSink),
}

impl ParamGather for GradTarget<'_> {
    fn gather(&mut self, stage: Stage, next: Option<Stage>) {
        if let Self::Sink(sink) = self {
            sink.gather(stage, next);
        }
    }

    fn release(&mut self, stage: Stage) {
        if let Self::Sink(sink) = self {
            sink.release(stage);
        }
    }
}

impl GradTarget<'_> {
    /// Backpropagates the scalar `root`: returns d root / d `leaves` (fresh leaves, so their
    /// `.grad` is this pass's alone) and, for a sink, d root / d `params` as new tensors (for
    /// `Accumulate` they went into `.grad` and the list is empty).
    fn run(
        &self,
        root: &Tensor,
        leaves: &[&Tensor],
        params: &[Tensor],
    ) -> (Vec<Tensor>, Vec<Tensor>) {
        if !root.requires_grad() {
            return (leaves.iter().map(|_| Tensor::new()).collect(), Vec::new());
        }
        match self {
            Self::Accumulate => {
                root.backward();
                (leaves.iter().map(|l| l.grad()).collect(), Vec::new())
            }
            Self::Sink(_) => {
                let inputs: Vec<&Tensor> = leaves.iter().copied().chain(params).collect();
                let mut grads = Tensor::run_backward(&[root], &inputs, false, false);
                let param_grads = grads.split_off(leaves.len());
                (grads, param_grads)
            }
        }
    }

    /// Gives a sink the gradients of one stage (`Accumulate` has nothing to do).
    fn hand_over(&mut self, params: &[Tensor], mut grads: Vec<Tensor>) {
        if let Self::Sink(sink) = self {
            grads.resize_with(params.len(), Tensor::new);
            sink.accept(params, grads);
        }
    }

    /// A stage the loss does not reach: a sink gets it with undefined gradients.
    fn skip(&mut self, params: &[Tensor]) {
        self.hand_over(params, Vec::new());
    }
}

/// Runs `stage` again with autograd from a detached copy of its saved `input` and
/// backpropagates `grad_output` through it: `sum(stage(x) * grad_output)` has gradient
/// `J^T grad_output`, which goes to the stage's `params` as `target` says. Returns the
/// gradient at the input, to pass to the stage before. Without a `grad_output` nothing is
/// recomputed and `target` gets the stage without gradients.
fn backward_through(
    target: &mut GradTarget<'_>,
    input: &Tensor,
    grad_output: Option<Tensor>,
    params: &[Tensor],
    stage: impl FnOnce(&Tensor) -> Tensor,
) -> Option<Tensor> {
    let Some(grad_output) = grad_output else {
        target.skip(params);
        return None;
    };
    let input = input.detach().set_requires_grad(true);
    let root = (stage(&input) * grad_output).sum(Kind::Float);
    let (mut input_grad, param_grads) = target.run(&root, &[&input], params);
    target.hand_over(params, param_grads);
    Some(input_grad.remove(0)).filter(Tensor::defined)
}

/// The stage a forward runs before layer `i`.
fn stage_before(i: usize) -> Stage {
    i.checked_sub(1).map_or(Stage::Embedding, Stage::Layer)
}

/// A stage of a forward pass: the parameters it uses are gathered together (ZeRO-3, see
/// [`ParamGather`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The token embeddings.
    Embedding,
    /// Decoder layer `i`.
    Layer(usize),
    /// The final norm and the LM head (with tied embeddings, the embedding variable).
    Head,
}

/// Where a pass gets the parameters of each [`Stage`] ([`Qwen2::stage_parameters`]): a pass
/// calls `gather` just before a stage runs (forward, or recomputed in a backward pass) and
/// `release` once it is done with it; the parameters are whole between the two. A whole
/// model has nothing to do ([`WholeParams`]); with ZeRO-3 the parameters are sharded and
/// each gather is a collective, so every rank must see the same calls in the same order. A
/// stage may be gathered again before it is released (a tied head and embedding).
pub trait ParamGather {
    /// Makes the parameters of `stage` whole; `next` is the stage the pass gathers after
    /// this one, for a prefetch.
    fn gather(&mut self, _stage: Stage, _next: Option<Stage>) {}
    /// The pass is done with `stage` for now.
    fn release(&mut self, _stage: Stage) {}
}

/// The parameters of an unsharded model: always whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct WholeParams;

impl ParamGather for WholeParams {}

impl<F: FnMut(&[Tensor], Vec<Tensor>)> ParamGather for F {}
