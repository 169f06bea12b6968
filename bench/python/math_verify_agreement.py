"""Agreement of math-verify (PyPI) with the human labels of prime-verifier's
tests/data/math_pairs.jsonl, and its speed; the Rust counterpart is
`cargo run --release -p prime-verifier --example math_agreement`. Prints one JSON line.

`prime bench verifier` (prime_verifier::bench) runs this script next to our grader and
reads its JSON line. The timed passes come after the agreement pass; math-verify's own
caches only hold compiled extraction patterns, not per-item results, so they are fair.

Usage: python3 bench/python/math_verify_agreement.py [FILE] [REPEATS]
Needs: math-verify (pinned in tests/python/requirements.txt; it pulls antlr4 4.13.2)
"""

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from math_verify import parse, verify

DEFAULT = Path(__file__).resolve().parents[2] / "verifier" / "tests" / "data" / "math_pairs.jsonl"


def grade(row):
    """math-verify's verdict: the reference in math mode, the candidate as an answer in math
    mode (or the whole response as text)."""
    gold = parse("$" + row["ground_truth"] + "$")
    if "answer" in row:
        candidate = parse("$" + row["answer"] + "$")
    else:
        candidate = parse(row["response"])
    try:
        return bool(verify(gold, candidate))
    except Exception:  # math-verify raises on some inputs; count that as "incorrect"
        return False


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_category = defaultdict(lambda: {"items": 0, "agreed": 0})
    disagreements = []
    for row in rows:
        agree = grade(row) == row["correct"]
        per_category[row["category"]]["items"] += 1
        per_category[row["category"]]["agreed"] += int(agree)
        if not agree:
            disagreements.append(row)
    start = time.perf_counter()
    for _ in range(repeats):
        for row in rows:
            grade(row)
    seconds = time.perf_counter() - start
    agreed = sum(c["agreed"] for c in per_category.values())
    print(json.dumps({
        "grader": "math-verify",
        "items": len(rows),
        "agreement": agreed / max(len(rows), 1),
        "per_category": dict(sorted(per_category.items())),
        "items_per_second": repeats * len(rows) / seconds,
        "disagreements": disagreements,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
