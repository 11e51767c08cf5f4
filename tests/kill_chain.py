"""SIGKILL a training run at seeded random steps, several times in a row, resuming each time from `--ckpt_path last`,
and return every loss it logged, so a test can compare the whole sequence with an uninterrupted run's.

A run is started in its own session and killed as a process group (all its DataLoader workers with it) as soon as the
checkpoint of its kill step is on disk; the next run resumes from the newest complete `last.ckpt`. The uninterrupted
reference run can go beside the chain (`beside=`): the chain's runs are single-threaded, so the second core is free.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(script: str, cfg: str, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), "fit", "--config", cfg, *extra], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def kill_steps(seed: int, last_step: int, kills: int) -> list[int]:
    """`kills` distinct increasing steps in [1, last_step - 1], drawn with `seed`."""
    return sorted(random.Random(seed).sample(range(1, last_step), kills))


def run_with_kills(script: str, cfg: str, ckpt_dir: str, steps: list[int], timeout: float = 600,
                   extra: tuple[str, ...] = (), beside: Optional[str] = None) -> None:
    """Run `cfg` (whose max_steps is the full run and which checkpoints every step into `ckpt_dir`), killing it with
    SIGKILL once `step{k:06d}.ckpt` exists for each k in `steps`, then let the last resume finish. `extra` goes on
    every command line (a strategy overlay, devices). `beside`: another config run uninterrupted meanwhile (its
    stderr goes to `<beside>.stderr`); it must finish cleanly too."""
    if beside is None:
        return _chain(script, cfg, ckpt_dir, steps, timeout, extra)
    with open(beside + ".stderr", "wb") as err:
        ref = start(script, beside, *extra, stderr=err)
        try:
            _chain(script, cfg, ckpt_dir, steps, timeout, extra)
        except BaseException:
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()
            raise
        code = ref.wait(timeout=timeout)
    assert code == 0, f"{beside}: " + open(beside + ".stderr").read()[-3000:]


def _chain(script: str, cfg: str, ckpt_dir: str, steps: list[int], timeout: float, extra: tuple[str, ...]) -> None:
    for i, k in enumerate(steps + [None]):
        proc = start(script, cfg, *extra, *(["--ckpt_path", "last"] if i else []))
        if k is None:
            assert proc.wait(timeout=timeout) == 0, proc.stderr.read().decode()[-3000:]
            return
        target = os.path.join(ckpt_dir, f"step{k:06d}.ckpt")
        deadline = time.time() + timeout
        while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert os.path.exists(target), f"kill {i + 1} at step {k}: " + proc.stderr.read().decode()[-3000:]


def logged_losses(root: str) -> dict[int, list[float]]:
    """Every loss RunSummary appended to `<root>/summary/losses.jsonl`, by step (a replayed step appears again)."""
    out: dict[int, list[float]] = {}
    with open(os.path.join(root, "summary", "losses.jsonl")) as f:
        for row in map(json.loads, f):
            out.setdefault(row["step"], []).append(row["loss"])
    return out
