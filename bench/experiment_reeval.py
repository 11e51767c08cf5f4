"""Re-evaluate the arms of a finished `gr experiment` on fresh layouts: another evaluation seed, so layouts that no
choice of recipe was made on. Same tasks, episodes and step limit as the experiment; the summary (per-arm Wilson
intervals, the pretrained - scratch Newcombe interval and paired counts) is computed by gr/experiment.py's code.

    python bench/experiment_reeval.py outputs/experiment_long/experiment.json --seed 1 --out outputs/reeval_s1.json

Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> dict:
    from gr.evaluate import evaluate
    from gr.experiment import EVAL_SEED, summarize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_json")
    p.add_argument("--seed", type=int, required=True, help="evaluation seed (the experiment used gr.experiment.EVAL_SEED)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.seed == EVAL_SEED:
        raise SystemExit(f"--seed: {EVAL_SEED} is the experiment's own evaluation seed; choose another")
    with open(args.experiment_json) as f:
        exp = json.load(f)
    ev = exp["eval"]
    tasks = ev["tasks"] + ev["eval_only_tasks"]
    arms, t0 = {}, time.time()
    for name, run in sorted(exp["arms"].items()):
        folder = os.path.join(os.path.dirname(args.out) or ".", "reeval", f"seed{args.seed}", name)
        report = evaluate(run["checkpoint"], tasks, episodes=ev["episodes_per_task"], seed=args.seed,
                          workers=args.workers, max_steps=ev["max_steps"], out=folder,
                          execute_steps=ev["execute_steps"], video=False)
        arms[name] = {**{k: run[k] for k in ("arm", "demos", "seed", "checkpoint")},
                      "success": {t: r["success_rate"] for t, r in report["tasks"].items()},
                      "episodes": {t: r["episodes"] for t, r in report["tasks"].items()}}
        print(f"[reeval] {name}: {arms[name]['success']}", flush=True)
    result = {"benchmark": "experiment_reeval", "experiment": args.experiment_json, "eval_seed": args.seed,
              "experiment_eval_seed": EVAL_SEED, "command": list(sys.argv), "arms": arms,
              "summary": summarize(arms, ev["tasks"], ev["eval_only_tasks"]),
              "wall_seconds": round(time.time() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["summary"]["pretrained_minus_scratch"], indent=2))
    return result


if __name__ == "__main__":
    main()
