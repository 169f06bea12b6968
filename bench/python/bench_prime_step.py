#!/usr/bin/env python3
"""Times the plain-PyTorch PRIME learner step of tests/python/prime_step_ref.py.

The reference script loads three models, runs one step (old and reference log-probs, PRM
update, advantages, PPO update) and saves the updated models. This wrapper runs its main()
`--repeats + 1` times in one process and times only the step of each run: from the moment the
third model is loaded to the moment the script starts saving. The first run is a warm-up and
is excluded. The reference pins torch to one thread; here $PRIME_THREADS (default 1) is used
instead, the same count the Rust side runs with.

Usage: bench_prime_step.py --repeats R -- <prime_step_ref.py arguments>
Prints one JSON line: seconds_all, threads, torch_version, transformers_version, gpu (null).
"""
import argparse
import json
import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "python"))

import torch  # noqa: E402
import transformers  # noqa: E402

import prime_step_ref as ref  # noqa: E402

THREADS = int(os.environ.get("PRIME_THREADS", "1"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")

    marks = {}
    loaded = {"count": 0}
    real_load = ref.load

    def load(path):
        model = real_load(path)
        loaded["count"] += 1
        if loaded["count"] % 3 == 0:
            marks["start"] = time.perf_counter()
        return model

    def makedirs(path, exist_ok=False):
        marks.setdefault("end", time.perf_counter())
        os.makedirs(path, exist_ok=exist_ok)

    ref.load = load
    # The script's `os` is only used for makedirs and path joins: a stand-in marks the end.
    ref.os = types.SimpleNamespace(makedirs=makedirs, path=os.path)
    real_set_threads = torch.set_num_threads
    ref.torch.set_num_threads = lambda _n: real_set_threads(THREADS)

    times = []
    for run in range(args.repeats + 1):
        marks.clear()
        sys.argv = ["prime_step_ref.py"] + rest
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                ref.main()
            finally:
                sys.stdout = stdout
        if run > 0:
            times.append(marks["end"] - marks["start"])
    print(json.dumps({"seconds_all": times, "threads": torch.get_num_threads(),
                      "torch_version": torch.__version__,
                      "transformers_version": transformers.__version__,
                      "gpu": None}), flush=True)


if __name__ == "__main__":
    main()
