"""Bytes that autograd keeps for the backward pass of one Qwen2 decoder layer and of the
log-prob head, as model/src/qwen2.rs computes them (bf16 weights and activations, RMSNorm
statistics in f32, RoPE tables and the boolean mask shared by all layers), measured with
torch.autograd.graph.saved_tensors_hooks and fitted to `a * T + b * T^2` per sequence.

Attention runs on PyTorch's math kernel: on CUDA, grouped-query attention (enable_gqa) runs only
on the flash and math kernels, and flash takes no explicit mask, so the model's boolean mask
sends it to the math kernel, which keeps its intermediates in f32.

Used by docs/memory.md. Prints one JSON object per shape:
    python bench/python/activation_bytes.py
"""
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BF16 = torch.bfloat16


def saved_bytes(build):
    """Bytes of distinct storages saved for backward by `build()`, excluding the storages of
    tensors it lists as shared (weights, RoPE tables, mask)."""
    seen = {}
    shared = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in shared:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    run, shared_tensors = build()
    shared.update(t.untyped_storage().data_ptr() for t in shared_tensors)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel(SDPBackend.MATH):
        run()
    return sum(seen.values())


def decoder_layer(t, d, heads, kv_heads, inter):
    hd = d // heads

    def build():
        def param(*shape):
            return (torch.randn(*shape, dtype=BF16) * 0.02).requires_grad_()

        wq, wk, wv, wo = param(heads * hd, d), param(kv_heads * hd, d), param(kv_heads * hd, d), param(d, heads * hd)
        bq, bk, bv = param(heads * hd), param(kv_heads * hd), param(kv_heads * hd)
        wg, wu, wd = param(inter, d), param(inter, d), param(d, inter)
        n1, n2 = param(d), param(d)
        x = torch.randn(1, t, d, dtype=BF16).requires_grad_()
        cos, sin = torch.randn(1, 1, t, hd, dtype=BF16), torch.randn(1, 1, t, hd, dtype=BF16)
        mask = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)

        def rms_norm(v, w):
            h = v.float()
            variance = h.pow(2).mean(-1, keepdim=True)
            return w * (h * torch.rsqrt(variance + 1e-6)).to(BF16)

        def rope(v):
            half = v.shape[-1] // 2
            return v * cos + torch.cat([-v[..., half:], v[..., :half]], -1) * sin

        def run():
            y = rms_norm(x, n1)
            q = F.linear(y, wq, bq).view(1, t, heads, hd).transpose(1, 2)
            k = F.linear(y, wk, bk).view(1, t, kv_heads, hd).transpose(1, 2)
            v = F.linear(y, wv, bv).view(1, t, kv_heads, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(
                rope(q), rope(k), v, attn_mask=mask, enable_gqa=heads != kv_heads
            )
            h = x + F.linear(a.transpose(1, 2).reshape(1, t, heads * hd), wo)
            z = rms_norm(h, n2)
            return h + F.linear(F.silu(F.linear(z, wg)) * F.linear(z, wu), wd)

        return run, [wq, wk, wv, wo, bq, bk, bv, wg, wu, wd, n1, n2, cos, sin, mask]

    return saved_bytes(build)


def logprob_head(t, d, vocab):
    def build():
        w = (torch.randn(vocab, d, dtype=BF16) * 0.02).requires_grad_()
        hidden = torch.randn(1, t, d, dtype=BF16).requires_grad_()
        targets = torch.randint(0, vocab, (1, t, 1))

        def run():
            logits = hidden.matmul(w.t()).float()
            return logits.log_softmax(-1).gather(-1, targets).squeeze(-1)

        return run, [w, hidden, targets]

    return saved_bytes(build)


def fit(measure):
    """Coefficients (per token, per T^2) from two sequence lengths."""
    a, b = measure(32), measure(64)
    per_t2 = (b - 2 * a) / (64 * 64 - 2 * 32 * 32)
    return (a - per_t2 * 32 * 32) / 32, per_t2


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for d, heads, kv_heads, inter in [(64, 4, 2, 96), (128, 8, 2, 160), (96, 4, 4, 64)]:
        per_token, per_t2 = fit(lambda t: decoder_layer(t, d, heads, kv_heads, inter))
        print(json.dumps({
            "part": "decoder_layer", "hidden": d, "heads": heads, "kv_heads": kv_heads,
            "intermediate": inter, "bytes_per_token": per_token, "bytes_per_t2": per_t2,
            "formula_per_token": 30 * d + 8 * inter + 8, "formula_per_t2": 4 * heads,
        }))
    for d, vocab in [(64, 500), (32, 1000)]:
        per_token, per_t2 = fit(lambda t: logprob_head(t, d, vocab))
        print(json.dumps({
            "part": "logprob_head", "hidden": d, "vocab": vocab, "bytes_per_token": per_token,
            "bytes_per_t2": per_t2, "formula_per_token": 4 * vocab,
        }))


if __name__ == "__main__":
    main()
