"""`gr report RUN_DIR`: one self-contained `report.html` for a run, viewable with no server and no wandb account.

RUN_DIR is a training run's folder (its `default_root_dir`) or a folder of several, such as `make demo`'s output.
Everything under it is collected:
- curves: every `summary/metrics.jsonl` (all metrics the run logged, written by `gr.training.callbacks.RunSummary`),
  else `summary/losses.jsonl`, plotted per stage with matplotlib; `summary/summary.json` as a table;
- rollouts: every `metrics.json` with samples (`gr rollout` output and the `RolloutVideos` callback's step folders):
  the GIFs and MP4s, and PSNR / SSIM / token accuracy per horizon step for the prediction, copy-last-frame and the
  tokenizer's ceiling;
- closed loop: every `eval.json` (`gr eval`): the success table and the episode videos;
- the resolved config: every LightningCLI `config.yaml`, or other YAML with `model:` and `trainer:` (make demo's).
Images, plots and videos are embedded as data URIs, so the file can be mailed or attached as it is. Media beyond
`--max-embed-mib` in all are linked by relative path instead, and the page says so.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from typing import Any, Optional

MIME = {".gif": "image/gif", ".png": "image/png", ".mp4": "video/mp4", ".webm": "video/webm", ".jpg": "image/jpeg"}
SKIP_DIRS = {"wandb", "checkpoints", "__pycache__", "data", "lightning_logs"}
# Every image and video announces itself when loaded or failed; the page's own errors are kept too. A browser test
# (or a person) reads the tallies from <body data-*>.
CHECK_SCRIPT = """
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message || e.type)); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var b = document.body.dataset;
  b.imagesTotal = imgs.length; b.imagesLoaded = ok;
  b.plotsTotal = document.querySelectorAll('img.plot').length;
  b.plotsLoaded = Array.prototype.slice.call(document.querySelectorAll('img.plot'))
    .filter(function (i) { return i.naturalWidth > 0; }).length;
  var vids = Array.prototype.slice.call(document.querySelectorAll('video'));
  b.videosTotal = vids.length;
  b.videosReady = vids.filter(function (v) { return v.readyState >= 1 && !v.error; }).length;
  b.errors = JSON.stringify(window.__errors);
  b.checked = 'yes';
});
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.media { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.media figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; max-width: 420px; }
img.plot { max-width: 100%; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.note { color: #a33; }
"""


class _Embedder:
    """Turns files into data URIs until the byte budget is spent, then into relative links."""

    def __init__(self, out_dir: str, budget_bytes: int):
        self.out_dir, self.left, self.linked = out_dir, budget_bytes, []

    def uri(self, path: str) -> str:
        size = os.path.getsize(path)
        mime = MIME.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
        if size > self.left:
            from urllib.parse import quote

            self.linked.append(path)
            return html.escape(quote(os.path.relpath(path, self.out_dir)))
        self.left -= size
        with open(path, "rb") as f:
            return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:  # a line cut by a kill mid-write
                        continue
    except OSError:
        pass
    return rows


def _walk(run_dir: str):
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        yield root, sorted(files)


def collect(run_dir: str) -> dict[str, list]:
    """What the report shows, found under run_dir: stages (summary folders), rollouts, evals, configs."""
    found: dict[str, list] = {"stages": [], "rollouts": [], "evals": [], "configs": []}
    for root, files in _walk(run_dir):
        rel = os.path.relpath(root, run_dir)
        if os.path.basename(root) == "summary" and ({"metrics.jsonl", "losses.jsonl", "summary.json"} & set(files)):
            found["stages"].append({"name": os.path.dirname(rel) or ".", "dir": root,
                                    "metrics": _read_jsonl(os.path.join(root, "metrics.jsonl")),
                                    "losses": _read_jsonl(os.path.join(root, "losses.jsonl")),
                                    "summary": _read_json(os.path.join(root, "summary.json"))})
        if "metrics.json" in files:
            doc = _read_json(os.path.join(root, "metrics.json"))
            if isinstance(doc, dict) and isinstance(doc.get("samples"), list):
                found["rollouts"].append({"name": rel, "dir": root, "doc": doc})
        if "eval.json" in files:
            doc = _read_json(os.path.join(root, "eval.json"))
            if isinstance(doc, dict) and isinstance(doc.get("tasks"), dict):
                found["evals"].append({"name": rel, "dir": root, "doc": doc})
        for name in files:  # LightningCLI's config.yaml, or a resolved config saved beside a run (make demo's)
            path = os.path.join(root, name)
            if not name.endswith((".yaml", ".yml")) or os.path.getsize(path) > 2**20:
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            if "model:" in text and "trainer:" in text:
                found["configs"].append({"name": os.path.join(rel, name), "text": text})
    return found


def _curves(stage: dict[str, Any]) -> Optional[str]:
    """One figure with a panel per logged metric (train and val), as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    rows = stage["metrics"] or [{"step": r["step"], "train/loss": r["loss"]} for r in stage["losses"]]
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or value != value:
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(step)
            ys.append(value)
    if not series:
        return None
    keys = sorted(series, key=lambda k: (not k.startswith("train/loss"), not k.startswith("train/"), k))[:24]
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = series[key]
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    uri = _png_uri(fig)
    plt.close(fig)
    return uri


def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<div style="overflow-x:auto"><table><tr>{head}</tr>{body}</table></div>'


def _horizon_table(metrics: dict[str, Any]) -> str:
    """Per horizon step: every per-step metric list (prediction, copy-last, VQ ceiling...)."""
    keys = [k for k, v in metrics.items() if isinstance(v, list) and v and isinstance(v[0], (int, float))]
    if not keys:
        return ""
    n = max(len(metrics[k]) for k in keys)
    rows = [[i + 1] + [metrics[k][i] if i < len(metrics[k]) else "" for k in keys] for i in range(n)]
    return _table(["horizon step"] + keys, rows)


def _media(path: str, emb: _Embedder, caption: str) -> str:
    src = emb.uri(path)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>"
    if path.lower().endswith((".mp4", ".webm")):
        return f'<figure><video controls muted loop preload="auto" src="{src}"></video>{cap}</figure>'
    return f'<figure><img alt="{html.escape(os.path.basename(path))}" src="{src}">{cap}</figure>'


def _resolve(path: str, folder: str, run_dir: str) -> Optional[str]:
    """A media path as recorded (absolute or relative to where the run was started), else the same name in folder;
    only files inside RUN_DIR, so a metrics.json naming some other file never puts it in a report meant to be sent."""
    root = os.path.join(os.path.realpath(run_dir), "")
    for candidate in (path, os.path.join(folder, path), os.path.join(folder, os.path.basename(path))):
        if candidate and os.path.isfile(candidate) and os.path.realpath(candidate).startswith(root):
            return candidate
    return None


def render(run_dir: str, out_path: str, max_embed_mib: float = 50.0) -> dict[str, Any]:
    """Write the report; returns what it holds (counts, linked files)."""
    found = collect(run_dir)
    emb = _Embedder(os.path.dirname(os.path.abspath(out_path)), int(max_embed_mib * 2**20))
    parts: list[str] = []
    w = parts.append
    title = os.path.basename(os.path.abspath(run_dir))
    w(f"<h1>gr run report: {html.escape(title)}</h1>")
    w(f"<p>{len(found['stages'])} training stage(s), {len(found['rollouts'])} rollout set(s), "
      f"{len(found['evals'])} closed-loop evaluation(s), {len(found['configs'])} config(s).</p>")
    top = _read_json(os.path.join(run_dir, "summary.json"))
    if isinstance(top, dict) and isinstance(top.get("checks"), dict):  # make demo's summary: its checks first
        w("<h2>Checks</h2>")
        w(_table(["check", "holds"], [[k, "yes" if v else "no"] for k, v in top["checks"].items()]))
    n_plots = 0
    if found["stages"]:
        w("<h2>Training curves</h2>")
    for stage in found["stages"]:
        w(f"<h3>{html.escape(stage['name'])}</h3>")
        uri = _curves(stage)
        if uri:
            n_plots += 1
            w(f'<img class="plot" alt="curves of {html.escape(stage["name"])}" src="{uri}">')
        summary = stage["summary"]
        if isinstance(summary, dict):
            w(_table(["summary", "value"], [[k, v] for k, v in summary.items() if isinstance(v, (int, float, str))]))
    if found["rollouts"]:
        w("<h2>Rollouts: prediction beside ground truth</h2>")
    for ro in found["rollouts"]:
        doc = ro["doc"]
        w(f"<h3>{html.escape(ro['name'])}</h3>")
        metrics = doc.get("metrics") or {}
        w(_horizon_table(metrics))
        for view, m in (metrics.get("per_view") or {}).items():
            w(f"<p>view <b>{html.escape(str(view))}</b></p>" + _horizon_table(m))
        media = []
        plot = _resolve(str(doc.get("plot") or "metrics.png"), ro["dir"], run_dir)
        if plot:
            n_plots += 1
            media.append(f'<figure><img class="plot" alt="metrics plot" src="{emb.uri(plot)}">'
                         "<figcaption>metrics per horizon step</figcaption></figure>")
        for s in doc["samples"]:
            for key in ("gif", "mp4"):
                path = _resolve(str(s.get(key) or ""), ro["dir"], run_dir) if s.get(key) else None
                if path:
                    media.append(_media(path, emb, f"{s.get('name', '')}: {s.get('caption', '')}"))
        w('<div class="media">' + "".join(media) + "</div>")
    if found["evals"]:
        w("<h2>Closed-loop evaluation</h2>")
    for ev in found["evals"]:
        doc = ev["doc"]
        w(f"<h3>{html.escape(ev['name'])}</h3>")
        rows = [[t, f"{100 * r.get('success_rate', 0):.0f}%", r.get("num_episodes", ""),
                 r.get("mean_steps_to_success") if r.get("mean_steps_to_success") is not None else "-"]
                for t, r in doc["tasks"].items()]
        rows.append(["mean", f"{100 * doc.get('mean_success_rate', 0):.1f}%", "", ""])
        w(_table(["task", "success", "episodes", "mean steps to success"], rows))
        media = [_media(p, emb, t) for t, r in doc["tasks"].items() if r.get("video")
                 for p in [_resolve(str(r["video"]), ev["dir"], run_dir)] if p]
        w('<div class="media">' + "".join(media) + "</div>")
    if found["configs"]:
        w("<h2>Resolved configs</h2>")
    for cfg in found["configs"]:
        w(f"<details><summary>{html.escape(cfg['name'])}</summary><pre>{html.escape(cfg['text'])}</pre>"
          "</details>")
    if emb.linked:
        w(f'<p class="note">{len(emb.linked)} file(s) beyond --max-embed-mib are linked, not embedded: '
          + ", ".join(html.escape(os.path.relpath(p, emb.out_dir)) for p in emb.linked) + "</p>")
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>gr report: {html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>{''.join(parts)}</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, out_path)
    return {"report": out_path, "stages": len(found["stages"]), "rollouts": len(found["rollouts"]),
            "evals": len(found["evals"]), "configs": len(found["configs"]), "plots": n_plots,
            "linked": emb.linked, "bytes": len(page)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="gr report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's folder (or a folder of runs, e.g. outputs/demo)")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    p.add_argument("--max-embed-mib", type=float, default=50.0,
                   help="embed images and videos up to this many MiB in all; link the rest")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"gr report: RUN_DIR not found: {args.run_dir!r}", file=sys.stderr)
        raise SystemExit(2)
    found = collect(args.run_dir)
    if not (found["stages"] or found["rollouts"] or found["evals"]):
        print(f"gr report: nothing to report under {args.run_dir!r} (no summary/, metrics.json or eval.json)",
              file=sys.stderr)
        raise SystemExit(2)
    result = render(args.run_dir, args.out or os.path.join(args.run_dir, "report.html"), args.max_embed_mib)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
