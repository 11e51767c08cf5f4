"""Markdown comparison of several `gr experiment` results that share their scratch arms (`--reuse-scratch`): per
pretraining corpus and demos level, the pretrained arm's mean success and its difference from scratch, per task.

    python bench/experiment_compare.py "in-domain=bench/results/experiment-cpu2.json" \
        "other tasks=bench/results/experiment_ood-cpu2.json" "synthetic only=bench/results/experiment_synthetic-cpu2.json"

Refuses results whose scratch arms are not the same runs (same episodes' outcomes), since the rows would then not be
comparable.
"""

from __future__ import annotations

import json
import sys

from experiment_table import pct


def scratch_outcomes(results: dict) -> dict:
    return {name: run["episodes"] for name, run in results["arms"].items() if run["arm"] == "scratch"}


def compare(labelled: list[tuple[str, dict]]) -> str:
    base_label, base = labelled[0]
    for label, results in labelled[1:]:
        if scratch_outcomes(results) != scratch_outcomes(base):
            raise SystemExit(f"experiment_compare: {label!r} has other scratch arms than {base_label!r}")
    groups = [g for g in base["summary"]["groups"] if g not in ("eval_only_mean",)]
    rows = ["| pretraining corpus | demos/task | " + " | ".join(groups) + " | pretrained - scratch (mean) |",
            "|" + "---|" * (3 + len(groups))]
    scratch = base["summary"]["by_arm"]["scratch"]
    for demos in sorted(scratch, key=int):
        rows.append(f"| none (scratch) | {demos} | " + " | ".join(pct(scratch[demos][g]) for g in groups) + " | |")
    for label, results in labelled:
        by = results["summary"]["by_arm"].get("pretrained", {})
        for demos in sorted(by, key=int):
            d = results["summary"]["pretrained_minus_scratch"][demos]["mean"]
            lo, hi = d["ci95"]
            rows.append(f"| {label} | {demos} | " + " | ".join(pct(by[demos][g]) for g in groups)
                        + f" | {100 * d['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    return "\n".join(rows)


if __name__ == "__main__":
    pairs = []
    for arg in sys.argv[1:]:
        label, path = arg.split("=", 1)
        with open(path) as f:
            pairs.append((label, json.load(f)))
    print(compare(pairs))
