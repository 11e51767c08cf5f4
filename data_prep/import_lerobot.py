"""Import a local LeRobot dataset folder (codebase v2.0, v2.1 or v3.0) into robot episode shards.

v2.x: `meta/info.json`, `meta/episodes.jsonl`, `meta/tasks.jsonl`; one parquet per episode (info's `data_path`) and
one mp4 per camera per episode (`video_path`), both templated on episode_chunk = episode_index // chunks_size.

v3.0: `meta/info.json`, `meta/episodes/chunk-*/file-*.parquet` (one row per episode), `meta/tasks.parquet`. Several
episodes share one data parquet, cut by `dataset_from_index`/`dataset_to_index` on the `index` column, and one mp4 per
camera, cut at `videos/<key>/from_timestamp` plus each frame's `timestamp`.

Camera views are the video features, or for datasets written with `use_videos=False` the image features (frames
stored in the data parquet as encoded PNG/JPEG bytes, or as paths next to it); `--cameras` picks some. Views are
named after the part of the key that follows `observation.images.`.

Instructions come from each frame's `task_index`, looked up in `meta/tasks.jsonl` / `meta/tasks.parquet`: an
episode's `tasks` list cannot say which frame had which task (lerobot writes it as `list(set(...))`, whose order
depends on the writer's hash seed). An episode whose frames carry several tasks is split into one episode per
contiguous run of a task (`episode_000003_part01`, ...), each with its own instruction: every training window then
sees the instruction its frames were recorded under. Windows that would span a task change are not formed.
Without a `task_index` column the episode's `tasks` decide, in sorted order (deterministic, with a warning when there
are several).

    python data_prep/import_lerobot.py --root path/to/lerobot_dataset --out data/my_robot --image-size 256
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import sys
from typing import Any, Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep._episodes import (  # noqa: E402
    add_common_args, as_2d, parse_indices, pick_instruction, positive_number, resize_views, run_cli, safe_name,
    split_list, write_episodes)
from gr.data.robot import Episode  # noqa: E402
from gr.data.video_io import VideoDecodeError, get_frames, open_video  # noqa: E402

VIEW_PREFIX = "observation.images."
CAMERA_DTYPES = ("video", "image")  # image: frames in the parquet (use_videos=False)
log = logging.getLogger(__name__)


def load_info(root: str) -> dict[str, Any]:
    """Read and check `meta/info.json`; raises ValueError naming the file and the missing field.

    Args:
        root: the dataset folder.
    """
    path = os.path.join(root, "meta", "info.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not found; --root must be a LeRobot dataset folder")
    with open(path) as f:
        try:
            info = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version", "")
    if not isinstance(version, str) or not version.startswith(("v2", "v3")):
        raise ValueError(f"{path}: codebase_version {version!r} is not supported (v2.0, v2.1 or v3.0)")
    for field in ("fps", "features", "data_path"):
        if field not in info:
            raise ValueError(f"{path}: missing field {field!r}")
    info["_path"], info["_v3"] = path, version.startswith("v3")
    _check_info(info, path)
    return info


def _check_info(info: dict[str, Any], path: str) -> None:
    """The types of the info.json fields the reader uses, so a mistyped one is named here and not met mid-import."""
    if not positive_number(info["fps"]):
        raise ValueError(f"{path}: field 'fps' must be a number > 0, got {info['fps']!r}")
    if "chunks_size" in info and not positive_number(info["chunks_size"], integer=True):
        raise ValueError(f"{path}: field 'chunks_size' must be an integer > 0, got {info['chunks_size']!r}")
    features = info["features"]
    if not isinstance(features, dict) or not all(isinstance(v, dict) for v in features.values()):
        raise ValueError(f"{path}: field 'features' must map feature names to objects")
    for key, ft in features.items():
        extra = ft.get("info")
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"{path}: features.{key}.info must be an object, got {type(extra).__name__}")
        fps = (extra or {}).get("video.fps")
        if fps is not None and not positive_number(fps):
            raise ValueError(f"{path}: features.{key}.info.video.fps must be a number > 0, got {fps!r}")
    keys = ({"chunk_index": 0, "file_index": 0, "video_key": "k"} if info["_v3"]
            else {"episode_chunk": 0, "episode_index": 0, "video_key": "k"})
    for field in ("data_path", "video_path"):
        template = info.get(field)
        if template is None and field == "video_path":
            continue
        try:
            if not isinstance(template, str) or not template:
                raise TypeError(f"expected a non-empty string, got {template!r}")
            template.format(**keys)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: field {field!r} is not a path template with {sorted(keys)}: {exc}") from None


def _check_episode_row(row: Any, where: str) -> dict[str, Any]:
    """One episode's metadata, checked where the importer reads its fields; raises ValueError naming the file."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: an episode row is {type(row).__name__}, expected an object")
    ep = row.get("episode_index")
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 0:
        raise ValueError(f"{where}: 'episode_index' must be an integer >= 0, got {ep!r}")
    if row.get("length") is not None and not positive_number(row["length"], integer=True):
        raise ValueError(f"{where}: episode {ep}: 'length' must be an integer > 0, got {row['length']!r}")
    tasks = row.get("tasks")
    if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise ValueError(f"{where}: episode {ep}: 'tasks' must be a list of strings, got {tasks!r}")
    for key, val in row.items():  # v3 location fields: chunk/file indices and timestamps
        if key.startswith(("data/", "videos/", "dataset_")) and val is not None and (
                isinstance(val, bool) or not isinstance(val, (int, float)) or not np.isfinite(val) or val < 0):
            raise ValueError(f"{where}: episode {ep}: {key!r} must be a number >= 0, got {val!r}")
    return row


def camera_views(info: dict[str, Any], cameras: Optional[list[str]]) -> dict[str, str]:
    """Feature key -> view name for the chosen cameras (default: every video feature).

    Args:
        info: `load_info`'s result.
        cameras: feature keys, or names after `observation.images.`; None for all.
    """
    videos = sorted(k for k, ft in info["features"].items() if ft.get("dtype") in CAMERA_DTYPES)
    views: dict[str, str] = {}
    for key in cameras or videos:
        if key not in info["features"] and VIEW_PREFIX + key in videos:
            key = VIEW_PREFIX + key  # a short name such as "top"
        if key not in videos:
            raise ValueError(f"{info['_path']}: camera {key!r} is not a video or image feature in 'features' "
                             f"(camera features: {videos})")
        view = safe_name(key[len(VIEW_PREFIX):] if key.startswith(VIEW_PREFIX) else key.split(".")[-1])
        if view in views.values():
            raise ValueError(f"{info['_path']}: cameras {key!r} and another one both map to view {view!r}")
        views[key] = view
    if not views:
        raise ValueError(f"{info['_path']}: no video or image features in 'features'")
    return views


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON lines: {exc}") from exc


def list_episodes(root: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per episode (v2: `meta/episodes.jsonl` lines, v3: `meta/episodes` parquet rows), with `_file`.

    Args:
        root: the dataset folder.
        info: `load_info`'s result.
    """
    if info["_v3"]:
        where = os.path.join(root, "meta", "episodes")
        files = sorted(glob.glob(os.path.join(where, "chunk-*", "*.parquet")))
        rows = []
        for path in files:
            names = [n for n in read_parquet(path, schema_only=True).names if not n.startswith("stats/")]
            rows += [{**row, "_file": path} for row in read_parquet(path, columns=names).to_pylist()]
    else:
        where = os.path.join(root, "meta", "episodes.jsonl")
        if not os.path.isfile(where):
            raise ValueError(f"{where}: not found (needed for codebase_version {info['codebase_version']})")
        rows = [{**_check_episode_row(row, where), "_file": where} for row in _read_jsonl(where)]
    for row in rows:
        if "episode_index" not in row:
            raise ValueError(f"{row['_file']}: an episode has no 'episode_index'")
        _check_episode_row(row, row["_file"])
    if len({r["episode_index"] for r in rows}) != len(rows):
        raise ValueError(f"{where}: an 'episode_index' appears twice")
    if not rows:
        raise ValueError(f"{where}: no episodes (empty dataset)")
    return sorted(rows, key=lambda r: r["episode_index"])


def load_tasks(root: str, info: dict[str, Any]) -> dict[int, str]:
    """task_index -> task text from `meta/tasks.jsonl` (v2) or `meta/tasks.parquet` (v3); {} when absent.

    Args:
        root: the dataset folder.
        info: `load_info`'s result.
    """
    if not info["_v3"]:
        path = os.path.join(root, "meta", "tasks.jsonl")
        if not os.path.isfile(path):
            return {}
        tasks = {}
        for n, r in enumerate(_read_jsonl(path), 1):
            if not (isinstance(r, dict) and isinstance(r.get("task"), str) and isinstance(r.get("task_index"), int)
                    and not isinstance(r.get("task_index"), bool)):
                raise ValueError(f"{path}: row {n} needs an integer 'task_index' and a string 'task', got {r!r}")
            tasks[r["task_index"]] = r["task"]
        return tasks
    import pandas as pd

    path = os.path.join(root, "meta", "tasks.parquet")
    if not os.path.isfile(path):
        return {}
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable parquet file: {exc}") from None
    if "task_index" not in df.columns:
        raise ValueError(f"{path}: no column 'task_index' (columns: {list(df.columns)})")
    texts = df["task"] if "task" in df.columns else df.index  # lerobot keeps the task text as the index
    return {int(i): str(t) for i, t in zip(df["task_index"], texts)}


def read_parquet(path: str, columns: Optional[list[str]] = None, schema_only: bool = False):
    """A pyarrow Table (or its schema); a corrupt or unreadable file is a ValueError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path) if schema_only else pq.read_table(path, columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: not a readable parquet file: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def column_array(table, key: str, where: str) -> np.ndarray:
    """A parquet column of fixed-length lists (or scalars) -> [T, D]; raises ValueError naming the column.

    Args:
        table: pyarrow Table.
        key: column name, e.g. `observation.state`.
        where: the parquet file, for error messages.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if key not in table.column_names:
        raise ValueError(f"{where}: no column {key!r} (columns: {table.column_names})")
    col = table.column(key).combine_chunks()
    if col.null_count:
        raise ValueError(f"{where}: column {key!r} has {col.null_count} missing values")
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        return as_2d(col.to_numpy(zero_copy_only=False), where, key)
    if len(np.unique(pc.list_value_length(col).to_numpy())) > 1:
        raise ValueError(f"{where}: column {key!r} has rows of different lengths")
    return as_2d(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1), where, key)


class LeRobotReader:
    """Reads episodes of one LeRobot dataset folder, keeping the current data parquet and videos open.

    Args:
        root: the dataset folder.
        info: `load_info`'s result.
        views: feature key -> view name (`camera_views`).
        state_key: state column.
        action_key: action column.
        tasks: task_index -> text (`load_tasks`).
    """

    def __init__(self, root: str, info: dict[str, Any], views: dict[str, str], state_key: str, action_key: str,
                 tasks: dict[int, str]):
        for key in (state_key, action_key):
            if key not in info["features"]:
                raise ValueError(f"{info['_path']}: no feature {key!r} in 'features' "
                                 f"(features: {sorted(info['features'])})")
        self.videos = [k for k in views if info["features"][k].get("dtype") == "video"]
        if self.videos and not info.get("video_path"):
            raise ValueError(f"{info['_path']}: missing field 'video_path' (needed for video features {self.videos})")
        self.root, self.info, self.views, self.tasks = root, info, views, tasks
        self.state_key, self.action_key = state_key, action_key
        self._table: tuple[Optional[str], Any] = (None, None)
        self._videos: dict[str, tuple[str, Any]] = {}

    def _field(self, row: dict[str, Any], name: str):
        if row.get(name) is None:
            raise ValueError(f"{row['_file']}: episode {row['episode_index']} has no {name!r}")
        return row[name]

    def paths(self, row: dict[str, Any]) -> tuple[str, dict[str, tuple[str, float]]]:
        """(data parquet, {camera key: (mp4, start time of the episode in it)}) of one episode.

        Args:
            row: the episode's metadata (`list_episodes`).
        """
        ep = int(row["episode_index"])
        if not self.info["_v3"]:
            chunk = ep // int(self.info.get("chunks_size", 1000))
            data = self.info["data_path"].format(episode_chunk=chunk, episode_index=ep)
            videos = {k: (self.info["video_path"].format(episode_chunk=chunk, video_key=k, episode_index=ep), 0.0)
                      for k in self.videos}
        else:
            data = self.info["data_path"].format(chunk_index=int(self._field(row, "data/chunk_index")),
                                                 file_index=int(self._field(row, "data/file_index")))
            videos = {}
            for k in self.videos:
                chunk, file = (int(self._field(row, f"videos/{k}/{n}")) for n in ("chunk_index", "file_index"))
                videos[k] = (self.info["video_path"].format(video_key=k, chunk_index=chunk, file_index=file),
                             float(self._field(row, f"videos/{k}/from_timestamp")))
        return (os.path.join(self.root, data),
                {k: (os.path.join(self.root, p), t0) for k, (p, t0) in videos.items()})

    def episode_table(self, row: dict[str, Any], path: str):
        """The episode's rows of its data parquet (v3: cut by dataset_from_index/dataset_to_index).

        Args:
            row: the episode's metadata.
            path: its data parquet.
        """
        if not os.path.isfile(path):
            raise ValueError(f"{path}: data file of episode {row['episode_index']} (listed in {row['_file']}, path "
                             f"from data_path in {self.info['_path']}) not found")
        if self._table[0] != path:
            self._table = (path, read_parquet(path))
        table = self._table[1]
        if self.info["_v3"]:
            lo, hi = int(self._field(row, "dataset_from_index")), int(self._field(row, "dataset_to_index"))
            index = column_array(table, "index", path)[:, 0]
            table = table.take(np.nonzero((index >= lo) & (index < hi))[0])
        if "episode_index" in table.column_names:
            found = set(column_array(table, "episode_index", path)[:, 0].tolist())
            if found != {row["episode_index"]}:
                raise ValueError(f"{path}: rows of episode {row['episode_index']} have 'episode_index' {found}")
        if row.get("length") is not None and table.num_rows != int(row["length"]):
            raise ValueError(f"{path}: episode {row['episode_index']} has {table.num_rows} rows but "
                             f"{row['_file']} says 'length' {row['length']}")
        return table

    def video_frames(self, key: str, path: str, times: np.ndarray, where: str) -> np.ndarray:
        """Decode camera `key` at the given times (seconds into `path`) -> uint8 [T, H, W, 3].

        Args:
            key: camera feature key.
            path: mp4 file.
            times: [T] seconds.
            where: the episode, for error messages.
        """
        if not os.path.isfile(path):
            raise ValueError(f"{path}: video of camera {key!r} for {where} not found (path from video_path in "
                             f"{self.info['_path']})")
        try:
            if self._videos.get(key, (None,))[0] != path:
                self._videos[key] = (path, open_video(path))
            vr = self._videos[key][1]
            fps = float(self.info["features"][key].get("info", {}).get("video.fps") or self.info["fps"])
            idx = np.round(times * fps).astype(np.int64)
            if idx.min() < 0 or idx.max() >= len(vr):
                raise ValueError(f"camera {key!r} has {len(vr)} frames but {where} needs frames "
                                 f"{idx.min()}..{idx.max()} (timestamps at {fps} fps, from {self.info['_path']})")
            return get_frames(vr, idx)
        except (VideoDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def read(self, row: dict[str, Any], fallback_instruction: Optional[str]) -> list[tuple[str, Episode, str]]:
        """Load one episode -> [(sample key, Episode, where)]: one entry, or one per task segment.

        Args:
            row: the episode's metadata.
            fallback_instruction: --instruction, for episodes without a task.
        """
        ep = int(row["episode_index"])
        data_path, videos = self.paths(row)
        try:
            return self._read(row, ep, data_path, videos, fallback_instruction)
        except (ValueError, OSError) as exc:  # pyarrow/pandas errors on a corrupt file may not name it
            if data_path in str(exc) or any(p in str(exc) for p, _ in videos.values()):
                raise
            raise ValueError(f"{data_path}: episode {ep}: {exc}") from exc

    def image_frames(self, table, key: str, where: str) -> np.ndarray:
        """Frames of image feature `key` stored in the data parquet (use_videos=False) -> uint8 [T, H, W, 3]. A cell is
        HF datasets' Image struct {bytes, path}: encoded bytes, or a path relative to the dataset folder."""
        from PIL import Image, UnidentifiedImageError

        if key not in table.column_names:
            raise ValueError(f"{where}: no column {key!r} for image feature {key!r}")
        frames = []
        for t, cell in enumerate(table.column(key).to_pylist()):
            data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
            path = cell.get("path") if isinstance(cell, dict) else None
            try:
                if data:
                    img = Image.open(io.BytesIO(data))
                elif path:
                    img = Image.open(path if os.path.isabs(path) else os.path.join(self.root, path))
                else:
                    raise ValueError("neither bytes nor a path")
                frames.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            except (OSError, ValueError, UnidentifiedImageError) as exc:
                raise ValueError(f"{where}: column {key!r} frame {t}: not a readable image: {exc}") from None
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"{where}: column {key!r} has frames of different sizes")
        return np.stack(frames)

    def _frame_tasks(self, table, row: dict[str, Any], data_path: str, ep: int) -> Optional[list[str]]:
        """Each frame's task text from its task_index, or None when the data has no task_index column."""
        if "task_index" not in table.column_names or not table.num_rows:
            return None
        index = column_array(table, "task_index", data_path)[:, 0].astype(np.int64)
        unknown = sorted(set(index.tolist()) - set(self.tasks))
        if unknown:
            raise ValueError(f"{data_path}: episode {ep}: task_index {unknown[0]} is not in the dataset's tasks file "
                             f"(meta/tasks.{'parquet' if self.info['_v3'] else 'jsonl'}: {sorted(self.tasks)})")
        return [self.tasks[int(i)] for i in index]

    def _read(self, row: dict[str, Any], ep: int, data_path: str, videos: dict[str, tuple[str, float]],
              fallback_instruction: Optional[str]) -> list[tuple[str, Episode, str]]:
        table = self.episode_table(row, data_path)
        where = f"{data_path}: episode {ep}"
        if "timestamp" in table.column_names:
            times = column_array(table, "timestamp", data_path)[:, 0].astype(np.float64)
        else:
            times = column_array(table, "frame_index", data_path)[:, 0] / float(self.info["fps"])
        frames = {self.views[k]: self.video_frames(k, p, t0 + times, f"episode {ep}") for k, (p, t0) in videos.items()}
        frames.update({self.views[k]: self.image_frames(table, k, where) for k in self.views if k not in videos})
        state = column_array(table, self.state_key, data_path)
        action = column_array(table, self.action_key, data_path)
        extra = {"episode_index": ep, "lerobot_version": self.info["codebase_version"],
                 "robot_type": self.info.get("robot_type")}
        per_frame = self._frame_tasks(table, row, data_path, ep)
        if per_frame is None:  # only the episode's task list: its order is arbitrary, so sort it
            listed = sorted({t for t in (row.get("tasks") or []) if isinstance(t, str)})
            if len(listed) > 1:
                log.warning("%s: %d tasks and no per-frame task_index: using %r", where, len(listed), listed[0])
                extra["tasks"] = listed
            per_frame = [listed[0] if listed else None] * len(state)
        # Contiguous runs of one task: [(start, stop, task)].
        runs, start = [], 0
        for t in range(1, len(per_frame) + 1):
            if t == len(per_frame) or per_frame[t] != per_frame[start]:
                runs.append((start, t, per_frame[start]))
                start = t
        key = f"episode_{ep:06d}"
        out = []
        for n, (a, b, task) in enumerate(runs):
            instruction = pick_instruction(f"{row['_file']}: episode {ep}", task, fallback_instruction, "the task")
            meta = dict(extra)
            if len(runs) > 1:
                meta.update(segment=n, frame_range=[a, b], tasks_in_episode=sorted({r[2] for r in runs if r[2]}))
            out.append((f"{key}_part{n:02d}" if len(runs) > 1 else key,
                        Episode({v: f[a:b] for v, f in frames.items()}, state[a:b], action[a:b], instruction,
                                float(self.info["fps"]), meta),
                        where if len(runs) == 1 else f"{where} frames {a}..{b - 1}"))
        return out


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Read the dataset at args.root and write its episodes to shards; returns the summary.

    Args:
        args: parsed command line.
    """
    root = os.path.abspath(args.root)
    info = load_info(root)
    reader = LeRobotReader(root, info, camera_views(info, split_list(args.cameras)), args.state_key,
                           args.action_key, load_tasks(root, info))
    rows = list_episodes(root, info)
    wanted = parse_indices(args.episodes)
    if wanted is not None:
        by_index = {int(r["episode_index"]): r for r in rows}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            raise ValueError(f"{rows[0]['_file']}: no episode(s) {missing} (have {min(by_index)}..{max(by_index)})")
        rows = [by_index[i] for i in wanted]

    def episodes() -> Iterator[tuple[str, Episode, str]]:
        for row in rows:
            for key, ep, where in reader.read(row, args.instruction):
                ep.frames = resize_views(ep.frames, args.image_size, where)
                yield key, ep, where

    return write_episodes(episodes(), len(rows), args, f"lerobot:{os.path.basename(root)}", "lerobot episodes")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this importer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="LeRobot dataset folder (holding meta/info.json)")
    p.add_argument("--state-key", default="observation.state", help="state feature")
    p.add_argument("--action-key", default="action", help="action feature")
    p.add_argument("--episodes", default=None, help="episode indices to import, e.g. 0,3,10-19; default: all")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(build_parser(), convert, argv)


if __name__ == "__main__":
    main()
