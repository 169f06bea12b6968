"""One PRIME learner step in plain PyTorch + transformers: the independent reference of the
Rust learner step (tests/tests/learner_step.rs).

Written from ../shared/reference/prime-spec.md §1-6, one response at a time (no padding, no
batching), with torch.optim.AdamW and torch.nn.utils.clip_grad_norm_:

  old log-probs (policy) and reference log-probs, no gradients;
  for each PRM mini-batch (whole groups, file order): per response the token log-ratio q,
    loss_i = BCE(sigmoid(beta * sum q), score), mean over the mini-batch, backward, clip 10,
    AdamW step; the rewards are the q of that same forward (single-forward);
  process rewards = q on valid tokens, divided by max |reverse cumsum| + 1e-6 over the batch;
  RLOO: r * K/(K-1) - sum_j mean_j/(K-1) for the process rewards; score_i - mean of the others
    on the last valid token for the outcome; reverse cumsums added; whitened with the unbiased
    variance over every valid token;
  for each PPO mini-batch: per response the token mean of max(-A rho, -A clip(rho, 0.8, 1.2)),
    mean over the mini-batch, backward, clip 1.0, AdamW step (weight decay 0.01);
  with --behavior-cap C (decoupled PPO, for groups sampled by an older policy): each token's
    term above is multiplied by w = min(exp(old - behaviour), C), the behaviour log-probs being
    the responses' "sampling_logprobs".

Usage: prime_step_ref.py --policy D --prm D --ref D --rollouts F --out D
       [--mini-batches N] [--beta B] [--policy-lr X] [--prm-lr Y] [--estimator prime|rloo]
       [--behavior-cap C]
Writes OUT/policy and OUT/prm (save_pretrained) and prints a JSON object of losses.
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM

from qwen2_ref import eos_ids


def load(path):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    model.train()  # no dropout in Qwen2; train() only documents intent
    return model


def valid_length(ids, eos):
    """Tokens up to and including the first EOS; all of them when there is none."""
    for t, tok in enumerate(ids):
        if tok in eos:
            return t + 1
    return len(ids)


def response_logprobs(model, prompt, response):
    """log p(response_t | prompt, response_<t) for every response token, shape [R]."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    p = len(prompt)
    steps = logits[p - 1: p - 1 + len(response)].log_softmax(-1)
    return steps.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def split_groups(n_groups, parts):
    parts = max(1, min(parts, n_groups))
    base, extra = divmod(n_groups, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def reverse_cumsum(row):
    return row.flip(0).cumsum(0).flip(0)


def main():
    ap = argparse.ArgumentParser()
    for name in ("policy", "prm", "ref", "rollouts", "out"):
        ap.add_argument("--" + name, required=True)
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--policy-lr", type=float, default=5e-7)
    ap.add_argument("--prm-lr", type=float, default=1e-6)
    ap.add_argument("--estimator", choices=["prime", "rloo"], default="prime")
    ap.add_argument("--behavior-cap", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with open(args.rollouts) as f:
        groups = [json.loads(line) for line in f if line.strip()]
    policy, prm, ref = load(args.policy), load(args.prm), load(args.ref)
    eos = eos_ids(policy)
    k = len(groups[0]["responses"])
    rows = [(g["prompt_ids"], r["ids"], float(r["score"]))
            for g in groups for r in g["responses"]]
    lengths = [valid_length(resp, eos) for _, resp, _ in rows]
    width = max(len(resp) for _, resp, _ in rows)
    n = len(rows)
    mask = torch.zeros(n, width)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1.0

    def padded(values):
        out = torch.zeros(n, width)
        for i, v in enumerate(values):
            out[i, :len(v)] = v
        return out * mask

    with torch.no_grad():
        old_lp = padded([response_logprobs(policy, p, r) for p, r, _ in rows])
        ref_lp = padded([response_logprobs(ref, p, r) for p, r, _ in rows])

    minis = [[g * k + i for g in part for i in range(k)]
             for part in split_groups(len(groups), args.mini_batches)]

    # PRM pass: single-forward rewards.
    q = torch.zeros(n, width)
    prm_losses = []
    if args.estimator == "prime":
        opt = torch.optim.AdamW(prm.parameters(), lr=args.prm_lr, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
        for mini in minis:
            opt.zero_grad()
            total = 0.0
            for i in mini:
                p, r, score = rows[i]
                lp = response_logprobs(prm, p, r)
                qi = (lp - ref_lp[i, :len(r)]) * mask[i, :len(r)]
                logit = args.beta * qi.sum()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, torch.tensor(score)) / len(mini)
                loss.backward()
                total += loss.item()
                q[i, :len(r)] = qi.detach()
            torch.nn.utils.clip_grad_norm_(prm.parameters(), 10.0)
            opt.step()
            prm_losses.append(total)

    # Rewards and advantages.
    scores = torch.tensor([s for _, _, s in rows])
    returns = torch.zeros(n, width)
    for g in range(len(groups)):
        idx = list(range(g * k, (g + 1) * k))
        for i in idx:
            others = [scores[j] for j in idx if j != i]
            outcome = torch.zeros(width)
            outcome[lengths[i] - 1] = scores[i] - sum(others) / (k - 1)
            returns[i] = reverse_cumsum(outcome)
    if args.estimator == "prime":
        rewards = q * mask
        largest = max(reverse_cumsum(rewards[i]).abs().max().item() for i in range(n))
        rewards = rewards / (largest + 1e-6)
        for g in range(len(groups)):
            idx = list(range(g * k, (g + 1) * k))
            means = [rewards[j].sum() / lengths[j] for j in idx]
            for i in idx:
                centred = (rewards[i] * k / (k - 1) - sum(means) / (k - 1)) * mask[i]
                returns[i] += reverse_cumsum(centred)
    valid = returns[mask.bool()]
    advantages = (returns - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8) * mask

    # PPO pass.
    opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.01)
    policy_losses = []
    for mini in minis:
        opt.zero_grad()
        total = 0.0
        for i in mini:
            p, r, _ = rows[i]
            lp = response_logprobs(policy, p, r)[:lengths[i]]
            ratio = torch.exp(lp - old_lp[i, :lengths[i]])
            a = advantages[i, :lengths[i]]
            token_loss = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
            if args.behavior_cap is not None:
                g, j = divmod(i, k)
                behaviour = torch.tensor(
                    groups[g]["responses"][j]["sampling_logprobs"][:lengths[i]])
                w = torch.exp(old_lp[i, :lengths[i]] - behaviour).clamp(max=args.behavior_cap)
                token_loss = token_loss * w
            loss = token_loss.mean() / len(mini)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        policy_losses.append(total)

    os.makedirs(args.out, exist_ok=True)
    policy.save_pretrained(os.path.join(args.out, "policy"))
    prm.save_pretrained(os.path.join(args.out, "prm"))
    print(json.dumps({
        "prm_loss": sum(prm_losses) / len(prm_losses) if prm_losses else 0.0,
        "policy_loss": sum(policy_losses) / len(policy_losses),
        "prm_losses": prm_losses,
        "policy_losses": policy_losses,
    }))


if __name__ == "__main__":
    main()
