#!/usr/bin/env python3
"""Independent plain-PyTorch reference for the PRIME algorithm core (learner/src/algo).

Written from ../shared/reference/prime-spec.md sections 0-6, one formula at a time and mostly
with explicit per-response / per-group loops, so that it shares no structure with the
vectorised Rust code it checks. Computation is in float64; filter bounds use exact rationals.

    PY=~/.cache/prime-rs/venv/bin/python
    $PY tests/python/prime_ref.py eval --input CASES.json

CASES.json: {"cases": [case, ...]}, each case (B = G*K rows, T columns, V vocabulary):
    k, eos_ids, response_ids [B][T], generated [B][T] (0/1, 0 = padding),
    prm_logprobs, ref_logprobs, old_logprobs, logprobs, policy_ref_logprobs [B][T],
    logits [B][T][V], scores [B], truncated [B] (0/1), config {
        beta, process_reward ("repo"|"recipe"), granularity ("token"|"whole"),
        norm ("batch_norm"|"none"), estimator ("prime"|"rloo"),
        process_baseline ("repo"|"paper"), process_gamma, outcome_gamma, clip_ratio,
        loss_aggregation ("seq_mean_token_mean"|"token_mean"), entropy_coeff, kl_coeff,
        kl_estimator ("k1"|"low_var_kl"), filter_enabled, filter_lower, filter_upper,
        drop_truncated }
Prints {"cases": [outputs, ...]} with, per case: mask, lengths, last_token, q,
sequence_reward, process_rewards, normalized_rewards, ce_loss, ce_grad (d/d prm_logprobs),
dpo_acc, dpo_acc_abs, loo_process, loo_outcome, returns, advantages, entropy_tokens, pg_loss,
clip_fraction, approx_kl, entropy, kl, loss, loss_grad (d/d logprobs), group_means, keep.  Every later quantity is computed from this script's own
earlier ones.
"""

import argparse
import json
import math
import os
from fractions import Fraction

import torch

torch.set_num_threads(int(os.environ.get("PRIME_THREADS", "2")))
F64 = torch.float64


def valid_mask(ids, generated, eos_ids):
    """Spec §0: tokens up to and including the first EOS; all of a truncated one; no padding."""
    rows = []
    for row_ids, row_gen in zip(ids, generated):
        row, ended = [], False
        for tok, gen in zip(row_ids, row_gen):
            ok = bool(gen) and not ended
            row.append(ok)
            if ok and tok in eos_ids:
                ended = True
        rows.append(row)
    return rows


def process_rewards(q, lengths, beta, variant, granularity):
    """Spec §2.2."""
    out = torch.zeros_like(q)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if granularity == "whole":
            scale = 1.0 if variant == "repo" else beta
            out[i, n - 1] = scale * q[i, :n].sum()
        elif variant == "repo":
            out[i, :n] = q[i, :n]
        else:  # recipe: β·q, last valid token excluded
            out[i, : n - 1] = beta * q[i, : n - 1]
    return out


def reverse_discounted(r, gamma):
    """G_t = Σ_{s≥t} γ^{s−t} r_s over the full row."""
    out = torch.zeros_like(r)
    B, T = r.shape
    for i in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            acc = r[i, t].item() + gamma * acc
            out[i, t] = acc
    return out


def normalize(r, norm):
    """Spec §2.5 prime_norm."""
    if norm == "none":
        return r.clone()
    G = reverse_discounted(r, 1.0)
    return r / (G.abs().max() + 1e-6)


def ce_loss(q, lengths, scores, beta):
    """Spec §3.1: mean_i −acc log σ(βΣq) − (1−acc) log(1−σ(βΣq))."""
    total = 0.0
    for i, n in enumerate(lengths):
        z = beta * q[i, :n].sum().item()
        s = 1.0 / (1.0 + math.exp(-z))
        a = scores[i]
        total += -(a * math.log(s) + (1.0 - a) * math.log(1.0 - s))
    return total / len(lengths)


def dpo_acc(S, scores, k):
    """Spec §3.5 (hit = (S_i > S_j) == (acc_i > acc_j), as the authors' code compares)."""
    groups = []
    for g in range(len(scores) // k):
        num = den = 0.0
        for i in range(g * k, g * k + k):
            for j in range(i + 1, g * k + k):
                da = scores[i] - scores[j]
                w = abs(da)
                hit = (S[i] - S[j] > 0) == (da > 0)
                num += w * hit
                den += w
        groups.append(0.5 if den == 0 else num / den)
    return sum(groups) / len(groups)


def ranking_acc(S, scores, k):
    """Within-group ranking: per group, over ordered pairs with scores[i] > scores[j], the
    share with S[i] > S[j] (ties half); the mean over groups that have such a pair, or None."""
    groups = []
    for g in range(len(scores) // k):
        rows = range(g * k, g * k + k)
        pairs = [(i, j) for i in rows for j in rows if scores[i] > scores[j]]
        if pairs:
            hits = sum(1.0 if S[i] > S[j] else 0.5 if S[i] == S[j] else 0.0 for i, j in pairs)
            groups.append(hits / len(pairs))
    return sum(groups) / len(groups) if groups else None


def sign(x):
    return (x > 0) - (x < 0)


def dpo_acc_abs(S, scores):
    return sum(sign(s) == sign(2 * a - 1) for s, a in zip(S, scores)) / len(scores)


def loo_process(p, lengths, k, baseline):
    """Spec §4.1 (repo) / §4.2 (paper) per group."""
    out = torch.zeros_like(p)
    for g in range(p.shape[0] // k):
        rows = range(g * k, g * k + k)
        m = {j: (p[j, : lengths[j]].sum().item() / lengths[j] if lengths[j] else 0.0) for j in rows}
        for i in rows:
            n = lengths[i]
            if baseline == "repo":
                b = sum(m.values()) / (k - 1)
                out[i, :n] = p[i, :n] * k / (k - 1) - b
            else:
                b = sum(m[j] for j in rows if j != i) / (k - 1)
                out[i, :n] = p[i, :n] - b
    return out


def loo_outcome(scores, lengths, k, T):
    """Spec §4.1 outcome part: acc_i − mean of the others, on token L_i − 1."""
    out = torch.zeros(len(scores), T, dtype=F64)
    for g in range(len(scores) // k):
        rows = range(g * k, g * k + k)
        for i in rows:
            if lengths[i]:
                others = [scores[j] for j in rows if j != i]
                out[i, lengths[i] - 1] = scores[i] - sum(others) / (k - 1)
    return out


def whiten(R, mask):
    """Spec §4.1: (R − μ)/sqrt(σ²_unbiased + 1e-8) over all valid tokens; padding 0."""
    sel = R[mask]
    mu, var = sel.mean(), sel.var(unbiased=True)
    return torch.where(mask, (R - mu) / torch.sqrt(var + 1e-8), torch.zeros_like(R))


def aggregate(x, mask, how):
    """Spec §6: token-mean per sequence then mean over sequences, or one token mean."""
    if how == "token_mean":
        return x[mask].mean()
    per_row = [x[i][mask[i]].mean() if mask[i].any() else x.new_zeros(()) for i in range(x.shape[0])]
    return torch.stack(per_row).mean()


def ce_loss_grad(prm, ref, lengths, scores, beta):
    """d CE / d log π_φ by autograd through the literal sigmoid-then-log formula (spec §3.1)."""
    prm = prm.clone().requires_grad_(True)
    terms = []
    for i, n in enumerate(lengths):
        s = torch.sigmoid(beta * (prm[i, :n] - ref[i, :n]).sum())
        terms.append(-(scores[i] * torch.log(s) + (1 - scores[i]) * torch.log(1 - s)))
    torch.stack(terms).mean().backward()
    return prm.grad


def run_case(c):
    cfg = c["config"]
    k = c["k"]
    mask_rows = valid_mask(c["response_ids"], c["generated"], set(c["eos_ids"]))
    mask = torch.tensor(mask_rows, dtype=torch.bool)
    B, T = mask.shape
    lengths = [sum(r) for r in mask_rows]
    for i, n in enumerate(lengths):  # the valid tokens form a prefix
        assert all(mask_rows[i][:n]) and not any(mask_rows[i][n:])
    last = [[t == n - 1 for t in range(T)] for n in lengths]
    t64 = lambda key: torch.tensor(c[key], dtype=F64)  # noqa: E731
    scores = [float(s) for s in c["scores"]]
    beta = cfg["beta"]

    q = torch.where(mask, t64("prm_logprobs") - t64("ref_logprobs"), torch.zeros(B, T, dtype=F64))
    seq_reward = [beta * q[i, : lengths[i]].sum().item() for i in range(B)]
    pr = process_rewards(q, lengths, beta, cfg["process_reward"], cfg["granularity"])
    normed = normalize(pr, cfg["norm"])
    S = [pr[i].sum().item() for i in range(B)]

    lp_proc = loo_process(normed, lengths, k, cfg["process_baseline"])
    lp_out = loo_outcome(scores, lengths, k, T)
    R = reverse_discounted(lp_out, cfg["outcome_gamma"])
    if cfg["estimator"] == "prime":
        R = R + reverse_discounted(lp_proc, cfg["process_gamma"])
    A = whiten(R, mask)

    lp, old = t64("logprobs").requires_grad_(True), t64("old_logprobs")
    ratio = torch.exp(lp - old)
    eps = cfg["clip_ratio"]
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - eps, 1 + eps)
    how = cfg["loss_aggregation"]
    pg = aggregate(torch.max(l1, l2), mask, how)
    clipfrac = aggregate((l2 > l1).to(F64), mask, how)
    approx_kl = aggregate(old - lp.detach(), mask, how)
    ent_tok = torch.distributions.Categorical(logits=t64("logits")).entropy()
    entropy = aggregate(ent_tok, mask, how)
    ref = t64("policy_ref_logprobs")
    if cfg["kl_estimator"] == "k1":
        kl_tok = lp - ref
    else:
        d = ref - lp
        kl_tok = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    kl = aggregate(kl_tok, mask, how)
    loss = pg - cfg["entropy_coeff"] * entropy + cfg["kl_coeff"] * kl
    loss.backward()

    fr = [Fraction(str(s)) for s in c["scores"]]
    means = [sum(fr[g * k:(g + 1) * k]) / k for g in range(B // k)]
    lo, hi = Fraction(str(cfg["filter_lower"])), Fraction(str(cfg["filter_upper"]))
    keep = []
    for g, m in enumerate(means):
        ok = lo <= m <= hi if cfg["filter_enabled"] else True
        if cfg["filter_enabled"] and cfg["drop_truncated"]:
            ok = ok and not any(c["truncated"][g * k:(g + 1) * k])
        keep.append(ok)

    return {
        "mask": mask_rows,
        "lengths": lengths,
        "last_token": last,
        "q": q.tolist(),
        "sequence_reward": seq_reward,
        "process_rewards": pr.tolist(),
        "normalized_rewards": normed.tolist(),
        "ce_loss": ce_loss(q, lengths, scores, beta),
        "ce_grad": ce_loss_grad(t64("prm_logprobs"), t64("ref_logprobs"), lengths, scores, beta).tolist(),
        "dpo_acc": dpo_acc(S, scores, k),
        "dpo_acc_abs": dpo_acc_abs(S, scores),
        "ranking_acc": ranking_acc(S, scores, k),
        "loo_process": lp_proc.tolist(),
        "loo_outcome": lp_out.tolist(),
        "returns": R.tolist(),
        "advantages": A.tolist(),
        "entropy_tokens": ent_tok.tolist(),
        "pg_loss": pg.item(),
        "clip_fraction": clipfrac.item(),
        "approx_kl": approx_kl.item(),
        "entropy": entropy.item(),
        "kl": kl.item(),
        "loss": loss.item(),
        "loss_grad": lp.grad.tolist(),
        "group_means": [float(m) for m in means],
        "keep": keep,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="compute every output for each case of a JSON file")
    ev.add_argument("--input", required=True)
    args = parser.parse_args()
    with open(args.input) as f:
        cases = json.load(f)["cases"]
    print(json.dumps({"cases": [run_case(c) for c in cases]}))


if __name__ == "__main__":
    main()
