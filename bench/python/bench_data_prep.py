#!/usr/bin/env python3
"""Data preparation the way a transformers user does it: the baseline of `prime bench data`.

Reads one Eurus-2-RL-Data parquet file with pyarrow, checks every row as the learner does
(roles, ability math/code, a user message with text, a ground truth, a JSON test spec for
code), applies the tokenizer's chat template with
`AutoTokenizer.from_pretrained(DIR).apply_chat_template(messages, tokenize=True,
add_generation_prompt=True)` row by row, and drops prompts over the length limit.

Usage::

    $PY bench/python/bench_data_prep.py --data train.parquet --tokenizer DIR \\
        [--max-prompt-tokens 1024] [--repeats 1] [--sample-every 500] [--ids-out IDS.jsonl]

Prints one JSON line: seconds (median over repeats, each from loading the tokenizer to the
filtered rows), seconds_all, stages (read, validate, tokenize seconds of the last repeat),
rows, kept, too_long, bad, threads, torch_version, transformers_version, gpu (null).
With --ids-out, the prompt ids of every kept row whose position in the file is a multiple of
--sample-every go there, one {"row": position, "ids": [...]} per line, for the Rust side to
compare with its own. No network: the tokenizer must be a local directory.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

ROLES = {"system", "user", "assistant"}


def spec_ok(text):
    """A code row's ground truth: a JSON object with equally many inputs and outputs (at
    least one) and, if present, an identifier as fn_name."""
    try:
        spec = json.loads(text)
    except ValueError:
        return False
    if not isinstance(spec, dict):
        return False
    inputs, outputs = spec.get("inputs"), spec.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        return False
    if len(inputs) != len(outputs) or not inputs:
        return False
    name = spec.get("fn_name")
    if name is not None:
        if not isinstance(name, str) or not name or not all(c.isalnum() or c == "_" for c in name):
            return False
    return True


def valid(prompt, ability, reward_model):
    """The checks of the learner's reader and validate_row, in the same order."""
    if not prompt:
        return False
    for message in prompt:
        if message is None or message.get("role") not in ROLES or message.get("content") is None:
            return False
    users = [m for m in prompt if m["role"] == "user"]
    if not users or not ability or reward_model is None:
        return False
    truth = reward_model.get("ground_truth")
    if truth is None or not truth:
        return False
    if ability not in ("math", "code"):
        return False
    if not users[-1]["content"].strip() or not truth.strip():
        return False
    if ability == "code" and not spec_ok(truth):
        return False
    return True


def prepare(data, tokenizer_dir, max_prompt_tokens, sample_every):
    """One full preparation; returns (stages, counts, sampled ids)."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = pq.read_table(data, columns=["prompt", "ability", "reward_model"])
    prompts = table.column("prompt").to_pylist()
    abilities = table.column("ability").to_pylist()
    rewards = table.column("reward_model").to_pylist()
    read = time.perf_counter()

    good = [i for i in range(len(prompts)) if valid(prompts[i], abilities[i], rewards[i])]
    validated = time.perf_counter()

    kept, too_long, sampled = 0, 0, []
    for i in good:
        ids = tokenizer.apply_chat_template(prompts[i], tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        kept += 1
        if sample_every and i % sample_every == 0:
            sampled.append((i, list(ids)))
    done = time.perf_counter()
    stages = {"read": read - start, "validate": validated - read, "tokenize": done - validated}
    counts = {"rows": len(prompts), "kept": kept, "too_long": too_long,
              "bad": len(prompts) - len(good)}
    return done - start, stages, counts, sampled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--ids-out")
    args = parser.parse_args()

    seconds_all = []
    for _ in range(args.repeats):
        seconds, stages, counts, sampled = prepare(
            args.data, args.tokenizer, args.max_prompt_tokens, args.sample_every)
        seconds_all.append(seconds)
    if args.ids_out:
        with open(args.ids_out, "w") as out:
            for row, ids in sampled:
                out.write(json.dumps({"row": row, "ids": ids}) + "\n")
    print(json.dumps({
        "impl": "transformers",
        "seconds": statistics.median(seconds_all),
        "seconds_all": seconds_all,
        "stages": stages,
        **counts,
        "threads": 1,
        "torch_version": importlib.metadata.version("torch"),
        "transformers_version": transformers.__version__,
        "gpu": None,
    }))


if __name__ == "__main__":
    main()
