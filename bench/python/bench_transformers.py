#!/usr/bin/env python3
"""Hugging Face transformers baseline for the prime-rs benchmarks.

Prints exactly one JSON line on stdout per run so the Rust bench harness can
parse it.  No network access: the hub is forced offline and the model must be
a local directory (e.g. one written by tests/python/qwen2_ref.py make).

Usage::

    PY=~/.cache/prime-rs/venv/bin/python

    # Sampled generation (temperature 1, top_p 1, no top_k), exactly N new
    # tokens per sequence (min_new_tokens = max_new_tokens = N).
    $PY bench/python/bench_transformers.py generate --model DIR \
        --batch B --prompt-len P --new-tokens N \
        [--device cpu|cuda[:N]] [--dtype float32|bfloat16] [--repeats R] \
        [--seed S] [--attn sdpa|eager]

    # No-grad forward + log_softmax + gather of next-token log-probs.
    $PY bench/python/bench_transformers.py logprobs --model DIR \
        --batch B --seq-len L \
        [--device cpu|cuda[:N]] [--dtype float32|bfloat16] [--repeats R] \
        [--seed S] [--attn sdpa|eager]

Output fields: impl, task, device, dtype, batch, (prompt_len, new_tokens |
seq_len), repeats, seconds (median over repeats; one warm-up run is always
excluded), seconds_all, tokens_per_s, threads, torch_version,
transformers_version, gpu (the CUDA device name, null on CPU).  For generate
tokens_per_s counts the generated tokens (batch * new_tokens); for logprobs it
counts the scored input tokens (batch * seq_len).

The number of CPU threads is taken from $PRIME_THREADS (default 2).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(int(os.environ.get("PRIME_THREADS", "2")))
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def device_name(name):
    """cpu, cuda or cuda:N."""
    if name == "cpu" or name == "cuda" or (
            name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise argparse.ArgumentTypeError(
        f"expected cpu, cuda or cuda:N, got {name!r}")


def environment(device):
    """What produced the numbers: threads, library versions and the GPU if any."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "gpu": gpu}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=DTYPES[args.dtype], attn_implementation=args.attn,
        local_files_only=True)
    model.to(device).eval()
    return model, device


def random_ids(vocab, batch, length, seed, device):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return ids.to(device)


def timed(fn, device, repeats):
    """Run fn once as warm-up, then `repeats` timed runs."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def bench_generate(args):
    model, device = load(args)
    cfg = model.config
    ids = random_ids(cfg.vocab_size, args.batch, args.prompt_len, args.seed,
                     device)
    mask = torch.ones_like(ids)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = cfg.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = cfg.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos or 0)
    n = args.new_tokens

    def run():
        out = model.generate(
            input_ids=ids, attention_mask=mask,
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            min_new_tokens=n, max_new_tokens=n, num_beams=1,
            eos_token_id=eos, pad_token_id=pad, use_cache=True)
        assert out.shape == (args.batch, args.prompt_len + n), out.shape
        return out

    torch.manual_seed(args.seed)
    times = timed(run, device, args.repeats)
    sec = statistics.median(times)
    return {"impl": "transformers", "task": "generate",
            "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "prompt_len": args.prompt_len,
            "new_tokens": n, "repeats": args.repeats,
            "seconds": sec, "seconds_all": times,
            "tokens_per_s": args.batch * n / sec}


@torch.inference_mode()
def bench_logprobs(args):
    model, device = load(args)
    ids = random_ids(model.config.vocab_size, args.batch, args.seq_len,
                     args.seed, device)

    def run():
        logits = model(input_ids=ids, use_cache=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    times = timed(run, device, args.repeats)
    sec = statistics.median(times)
    return {"impl": "transformers", "task": "logprobs",
            "device": str(device), "dtype": args.dtype,
            "batch": args.batch, "seq_len": args.seq_len,
            "repeats": args.repeats,
            "seconds": sec, "seconds_all": times,
            "tokens_per_s": args.batch * args.seq_len / sec}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s):
        s.add_argument("--model", required=True)
        s.add_argument("--batch", type=int, required=True)
        s.add_argument("--device", type=device_name, default="cpu")
        s.add_argument("--dtype", choices=list(DTYPES), default="float32")
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")

    g = sub.add_parser("generate", help="time sampled model.generate")
    common(g)
    g.add_argument("--prompt-len", type=int, required=True)
    g.add_argument("--new-tokens", type=int, required=True)
    g.set_defaults(func=bench_generate)

    lp = sub.add_parser("logprobs", help="time forward + log-prob gather")
    common(lp)
    lp.add_argument("--seq-len", type=int, required=True)
    lp.set_defaults(func=bench_logprobs)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    print(json.dumps({**args.func(args), **environment(args.device)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
