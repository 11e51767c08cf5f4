"""Long fuzz run: the properties of tests/test_fuzz.py with fresh random cases at volume.

    python tools/fuzz_inputs.py --examples 500            # per target; prints JSON

Targets: mutated mp4 bytes (decoded in a forked child, so a native decoder crash is counted, not fatal), clip
metadata JSON, pre-tokenized code arrays, YAML config values, robomimic HDF5 files and LeRobot metadata. Each case
must give a valid result or a clear one-line error / counted skip. Reports cases tried per target and the targets
that found a failing case (hypothesis stops a target at its first failure and shrinks it; the example is in the
pytest output, `--show` prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def decord_crash_rate(cases: int, seed: int = 0) -> dict:
    """Byte-mutated copies of a small H.264 mp4, each opened and fully decoded by decord in a forked child: how many
    kill the process (a signal) instead of raising. Then each goes through gr's default path, the sandboxed decoder
    (gr/data/decode_sandbox.py), in this process: every crash must come back as a VideoDecodeError and this process
    must live through all of them."""
    import io
    import random

    import decord
    import numpy as np

    sys.path.insert(0, REPO)
    from gr.data import decode_sandbox
    from gr.data.video_io import VideoDecodeError, encode_mp4, get_frames, open_video

    good = encode_mp4(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 8.0)
    rng = random.Random(seed)
    counts = {"cases": cases, "crashes": 0, "python_errors": 0, "sandboxed_decode_errors": 0,
              "sandboxed_crashes_reported": 0}
    for _ in range(cases):
        data = bytearray(good)
        for _ in range(rng.randint(1, 24)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data)
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # FFmpeg's complaints about the corrupt input
            try:
                vr = decord.VideoReader(io.BytesIO(data))
                vr.get_batch(list(range(len(vr)))).asnumpy()
            except Exception:  # noqa: BLE001 - a Python error is the good outcome here
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        counts["crashes"] += int(os.WIFSIGNALED(status))
        counts["python_errors"] += int(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3)
        try:
            vr = open_video(data, sandbox=True)
            get_frames(vr, range(len(vr)))
        except VideoDecodeError as exc:
            counts["sandboxed_decode_errors"] += 1
            counts["sandboxed_crashes_reported"] += int("decoder process died" in str(exc))
    counts["sandboxed_decoder_restarts"] = decode_sandbox.decoder().crashes
    counts["sandboxed_caller_crashes"] = 0  # reached: this process decoded every case through the sandbox and lives
    return counts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=500, help="cases per target")
    p.add_argument("-k", default=None, help="pytest -k expression to pick targets")
    p.add_argument("--show", action="store_true", help="print pytest's output (failing examples)")
    p.add_argument("--decord-crash-rate", type=int, default=0, metavar="N",
                   help="instead: decode N byte-mutated mp4s with decord in child processes and count crashes")
    args = p.parse_args(argv)
    if args.decord_crash_rate:
        result = decord_crash_rate(args.decord_crash_rate)
        print(json.dumps(result, indent=2))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = os.path.join(tmp, "cases.json"), os.path.join(tmp, "junit.xml")
        env = {**os.environ, "GR_FUZZ_RANDOM": "1", "GR_FUZZ_EXAMPLES": str(args.examples),
               "GR_FUZZ_REPORT": report, "PYTHONPATH": REPO}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(REPO, "tests",
               "test_fuzz.py"), f"--junitxml={junit}"] + (["-k", args.k] if args.k else [])
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if args.show:
            print(proc.stdout[-20000:], file=sys.stderr)
        cases = json.load(open(report)) if os.path.isfile(report) else {}
        failed = []
        if os.path.isfile(junit):
            for case in ET.parse(junit).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(case.get("name"))
    result = {"examples_per_target": args.examples, "cases": cases, "cases_total": sum(cases.values()),
              "targets_failed": failed, "seconds": round(time.time() - t0, 1), "pytest_rc": proc.returncode}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
