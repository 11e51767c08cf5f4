"""Markdown table of a `gr experiment` result: success per arm, demos and task with 95% intervals, and the headline
pretrained - scratch difference. Used for the README's results section.

    python bench/experiment_table.py bench/results/experiment-cpu2.json
"""

from __future__ import annotations

import json
import sys


def pct(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{100 * p['success']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] ({p['successes']}/{p['episodes']})"


def table(results: dict) -> str:
    s = results["summary"]
    groups = list(s["groups"])
    rows = ["| arm | demos/task | seeds | " + " | ".join(groups) + " |", "|" + "---|" * (3 + len(groups))]
    for arm, by_demos in sorted(s["by_arm"].items()):
        for demos, r in sorted(by_demos.items(), key=lambda kv: int(kv[0])):
            rows.append(f"| {arm} | {demos} | {','.join(map(str, r['seeds']))} | "
                        + " | ".join(pct(r[g]) for g in groups) + " |")
    lines = ["\n".join(rows), ""]
    for demos, diff in sorted(s["pretrained_minus_scratch"].items(), key=lambda kv: int(kv[0])):
        d = diff["mean"]
        lo, hi = d["ci95"]
        lines.append(f"- {demos} demos/task, mean over finetuning tasks: pretrained - scratch = "
                     f"{100 * d['difference']:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; paired "
                     f"{d.get('paired')}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1]))))
