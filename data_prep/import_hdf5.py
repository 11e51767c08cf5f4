"""Import HDF5 robot demonstrations (robomimic or ALOHA layout) into robot episode shards.

robomimic (also LIBERO): one file, many demos
    data/demo_N/obs/<camera>_image   uint8 [T, H, W, 3]   one view per camera, named <camera>
    data/demo_N/obs/<key>            [T, d]   state = these keys concatenated in --state-keys order
    data/demo_N/actions              [T, A]
    data attrs problem_info          JSON with language_instruction (LIBERO)
    data attrs env_args              JSON with env_name and env_kwargs.control_freq (the fps)
ALOHA: one episode per file, --input is a folder of episode_*.hdf5 (or one file)
    /observations/images/<camera>    uint8 [T, H, W, 3], or JPEG bytes [T, N] in compressed recordings
    /observations/qpos               [T, 14]  (--state-keys picks other /observations datasets)
    /action                          [T, 14]
    instruction: root attribute or dataset `language_instruction` or `instruction`

The instruction is the file's own language instruction if it has one, else --instruction, else (robomimic only) the
environment name from env_args.

    python data_prep/import_hdf5.py --input image_demos.hdf5 --out data/lift --instruction "lift the cube"
    python data_prep/import_hdf5.py --input aloha_episodes/ --out data/aloha --instruction "insert the peg"
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
from typing import Any, Iterator, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep._episodes import (  # noqa: E402
    add_common_args, as_2d, check_lengths, natural_key, pick_instruction, positive_number, resize_views, run_cli,
    safe_name, split_list, write_episodes)
from gr.data.robot import Episode  # noqa: E402

DEFAULTS = {  # per layout: state keys, action key, fps
    "robomimic": (["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"], "actions", 20.0),
    "aloha": (["qpos"], "action", 50.0),
}
INSTRUCTION_KEYS = ("language_instruction", "instruction")


def list_files(path: str) -> list[str]:
    """The HDF5 files to read: `path` itself, or a folder's episode_*.hdf5 (else *.hdf5 / *.h5) in natural order.

    Args:
        path: --input.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"--input: {path!r} is neither a file nor a folder")
    files = glob.glob(os.path.join(path, "episode_*.hdf5"))
    files = files or glob.glob(os.path.join(path, "*.hdf5")) + glob.glob(os.path.join(path, "*.h5"))
    if not files:
        raise ValueError(f"{path}: no .hdf5 files (empty dataset)")
    return sorted(files, key=natural_key)


def open_hdf5(path: str):
    """h5py.File opened for reading; raises ValueError naming the file when it is not HDF5.

    Args:
        path: the file.
    """
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:  # h5py's message does not name the file
        raise ValueError(f"{path}: not a readable HDF5 file: {exc}") from exc


def detect_layout(f, path: str, layout: str) -> str:
    """'robomimic' or 'aloha' from the file's root groups; checks a forced --layout against them.

    Args:
        f: open h5py.File.
        path: its name, for error messages.
        layout: --layout (auto, robomimic or aloha).
    """
    found = "robomimic" if "data" in f else "aloha" if "observations" in f else None
    if layout == "auto" and found is None:
        raise ValueError(f"{path}: neither a 'data' group (robomimic) nor 'observations' (ALOHA) at the root; "
                         f"root keys: {sorted(f.keys())}")
    if layout != "auto" and layout != found:
        need = "'data'" if layout == "robomimic" else "'observations'"
        raise ValueError(f"{path}: --layout {layout} needs a root group {need}; root keys: {sorted(f.keys())}")
    return found


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else ""
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def _json_attr(group, name: str, where: str) -> dict[str, Any]:
    if name not in group.attrs:
        return {}
    try:
        value = json.loads(_text(group.attrs[name]))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: attribute {name!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{where}: attribute {name!r} must be a JSON object, got {type(value).__name__}")
    return value


def _control_freq(env_args: dict[str, Any], where: str) -> Optional[float]:
    """env_args.env_kwargs.control_freq (robomimic's control rate in Hz), checked; None when absent."""
    kwargs = env_args.get("env_kwargs") or {}
    freq = kwargs.get("control_freq") if isinstance(kwargs, dict) else None
    if not isinstance(kwargs, dict) or (freq is not None and not positive_number(freq)):
        raise ValueError(f"{where}: attribute env_args.env_kwargs.control_freq must be a number > 0, got "
                         f"{kwargs if not isinstance(kwargs, dict) else freq!r}")
    return None if freq is None else float(freq)


def read_array(group, key: str, where: str) -> np.ndarray:
    """group[key] as a numpy array; raises ValueError naming the file, group and key when absent.

    Args:
        group: h5py group.
        key: dataset name inside it.
        where: file and group, for error messages.
    """
    if key not in group:
        raise ValueError(f"{where}: no key {key!r} (keys: {sorted(group.keys())})")
    return group[key][()]


def decode_images(x: np.ndarray, where: str, key: str) -> np.ndarray:
    """uint8 [T, H, W, 3] as is, or [T, N] rows of JPEG/PNG bytes (zero padded, as ALOHA compresses) decoded to RGB.

    Args:
        x: the camera dataset.
        where: file and group, for error messages.
        key: the camera dataset's name.
    """
    if x.ndim != 2:
        return x
    from PIL import Image

    try:
        return np.stack([np.asarray(Image.open(io.BytesIO(row.tobytes())).convert("RGB")) for row in x])
    except OSError as exc:
        raise ValueError(f"{where}: {key!r} is 2-D but its rows are not encoded images: {exc}") from exc


def read_views(group, keys: dict[str, str], where: str, flip: str) -> dict[str, np.ndarray]:
    """View name -> frames for camera datasets `keys` (dataset name -> view name) of `group`.

    Args:
        group: h5py group holding the camera datasets.
        keys: dataset name -> view name.
        where: file and group, for error messages.
        flip: none, vertical or rotate180 (LIBERO renders upside down).
    """
    frames = {view: decode_images(read_array(group, key, where), where, key) for key, view in keys.items()}
    if flip == "vertical":
        frames = {v: x[:, ::-1] for v, x in frames.items()}
    elif flip == "rotate180":
        frames = {v: x[:, ::-1, ::-1] for v, x in frames.items()}
    return {v: np.ascontiguousarray(x) for v, x in frames.items()}


def read_state(group, keys: list[str], where: str, prefix: str) -> tuple[np.ndarray, dict[str, int]]:
    """Concatenate state datasets in the given order -> ([T, S], {name: steps}).

    Args:
        group: h5py group holding the state datasets.
        keys: their names, in order.
        where: file and group, for error messages.
        prefix: group path shown in the step counts (e.g. 'obs/').
    """
    parts = [as_2d(read_array(group, k, where), where, k) for k in keys]
    lengths = {prefix + k: len(x) for k, x in zip(keys, parts)}
    check_lengths(where, lengths)
    return np.concatenate(parts, axis=1), lengths


def camera_keys(available: list[str], wanted: Optional[list[str]], suffix: str, where: str) -> dict[str, str]:
    """Camera dataset name -> view name. `available` are dataset names; `wanted` may omit the suffix.

    Args:
        available: camera datasets present (robomimic: obs keys ending in '_image').
        wanted: --cameras, or None for all.
        suffix: '_image' for robomimic, '' for ALOHA.
        where: file and group, for error messages.
    """
    strip = (lambda k: k[:-len(suffix)] if k.endswith(suffix) else k) if suffix else (lambda k: k)
    by_view = {strip(k): k for k in available if k.endswith(suffix)}
    out = {}
    for cam in wanted or sorted(by_view):
        if strip(cam) not in by_view:
            raise ValueError(f"{where}: no camera key {strip(cam) + suffix!r} (cameras: {sorted(by_view)})")
        out[by_view[strip(cam)]] = safe_name(strip(cam))
    if not out:
        raise ValueError(f"{where}: no camera images")
    return out


def robomimic_episode(f, path: str, demo: str, args: argparse.Namespace) -> tuple[Episode, str]:
    """Read data/<demo> of a robomimic file.

    Args:
        f: open h5py.File.
        path: its name.
        demo: demo group name, e.g. demo_0.
        args: parsed command line.
    """
    where, group = f"{path}: data/{demo}", f["data"][demo]
    if "obs" not in group:
        raise ValueError(f"{where}: no key 'obs' (keys: {sorted(group.keys())})")
    obs = group["obs"]
    state_keys, action_key, fps = DEFAULTS["robomimic"]
    action_key = args.action_key or action_key
    env_args = _json_attr(f["data"], "env_args", f"{path}: data")
    problem = _json_attr(f["data"], "problem_info", f"{path}: data")
    views = camera_keys([k for k in obs if k.endswith("_image")], split_list(args.cameras), "_image", where + "/obs")
    state, lengths = read_state(obs, args.state_keys or state_keys, where + "/obs", "obs/")
    action = as_2d(read_array(group, action_key, where), where, action_key)
    frames = read_views(obs, views, where + "/obs", args.flip)
    check_lengths(where, {**lengths, action_key: len(action),
                          **{f"obs/{k}": len(frames[v]) for k, v in views.items()}})
    env_name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(env_args.get("env_name", ""))).replace("_", " ").lower()
    text = problem.get("language_instruction")
    instruction = pick_instruction(where, text if isinstance(text, str) else None, args.instruction or env_name,
                                   "data attribute problem_info.language_instruction")
    fps = args.fps or _control_freq(env_args, f"{path}: data") or fps
    return Episode(frames, state, action, instruction, fps, {"source_file": os.path.basename(path),
                                                              "demo": demo}), where


def aloha_instruction(f) -> Optional[str]:
    """A language instruction stored in an ALOHA-style file (root attribute or dataset), or None.

    Args:
        f: open h5py.File.
    """
    for key in INSTRUCTION_KEYS:
        if key in f.attrs:
            return _text(f.attrs[key])
        if key in f:
            return _text(f[key][()])
    return None


def aloha_episode(f, path: str, args: argparse.Namespace) -> tuple[Episode, str]:
    """Read the one episode of an ALOHA file.

    Args:
        f: open h5py.File.
        path: its name.
        args: parsed command line.
    """
    state_keys, action_key, fps = DEFAULTS["aloha"]
    obs = f["observations"]
    if "images" not in obs:
        raise ValueError(f"{path}: no key 'observations/images' (keys: {sorted(obs.keys())})")
    views = camera_keys(list(obs["images"].keys()), split_list(args.cameras), "", f"{path}: observations/images")
    state, lengths = read_state(obs, args.state_keys or state_keys, f"{path}: observations", "observations/")
    action_key = args.action_key or action_key
    action = as_2d(read_array(f, action_key, path), path, action_key)
    frames = read_views(obs["images"], views, f"{path}: observations/images", args.flip)
    check_lengths(path, {**lengths, action_key: len(action),
                         **{f"observations/images/{k}": len(frames[v]) for k, v in views.items()}})
    instruction = pick_instruction(path, aloha_instruction(f), args.instruction,
                                   f"attribute or dataset {' / '.join(INSTRUCTION_KEYS)}")
    return Episode(frames, state, action, instruction, args.fps or fps,
                   {"source_file": os.path.basename(path)}), path


def list_episodes(files: list[str], layout: str) -> list[tuple[str, str, Optional[str]]]:
    """(file, layout, robomimic demo or None) for every episode, in natural order.

    Args:
        files: `list_files`' result.
        layout: --layout.
    """
    import h5py

    jobs = []
    for path in files:
        with open_hdf5(path) as f:
            found = detect_layout(f, path, layout)
            if found == "aloha":
                jobs.append((path, found, None))
                continue
            demos = sorted((k for k in f["data"] if isinstance(f["data"][k], h5py.Group)), key=natural_key)
            if not demos:
                raise ValueError(f"{path}: no demos under 'data' (empty dataset)")
            jobs += [(path, found, demo) for demo in demos]
    return jobs


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Read every episode under args.input and write shards; returns the summary.

    Args:
        args: parsed command line.
    """
    args.state_keys = split_list(args.state_keys)
    jobs = list_episodes(list_files(args.input), args.layout)

    def episodes() -> Iterator[tuple[str, Episode, str]]:
        open_path, f = None, None
        try:
            for path, _layout, demo in jobs:
                if path != open_path:
                    if f is not None:
                        f.close()
                    open_path, f = path, open_hdf5(path)
                stem = safe_name(os.path.splitext(os.path.basename(path))[0])
                ep, where = robomimic_episode(f, path, demo, args) if demo else aloha_episode(f, path, args)
                ep.frames = resize_views(ep.frames, args.image_size, where)
                yield (f"{stem}_{safe_name(demo)}" if demo else stem), ep, where
        finally:
            if f is not None:
                f.close()

    name = os.path.basename(os.path.normpath(args.input))
    return write_episodes(episodes(), len(jobs), args, f"hdf5:{name}", "hdf5 episodes")


def build_parser() -> argparse.ArgumentParser:
    """The command line of this importer."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an HDF5 file, or a folder of episode_*.hdf5")
    p.add_argument("--layout", choices=("auto", "robomimic", "aloha"), default="auto", help="file layout")
    p.add_argument("--state-keys", default=None,
                   help="comma-separated obs datasets concatenated into the state, in this order; default: "
                        "robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos (robomimic), qpos (ALOHA)")
    p.add_argument("--action-key", default=None, help="action dataset; default: actions (robomimic), action (ALOHA)")
    p.add_argument("--fps", type=float, default=None,
                   help="control rate; default: env_args control_freq or 20 (robomimic), 50 (ALOHA)")
    p.add_argument("--flip", choices=("none", "vertical", "rotate180"), default="none",
                   help="flip every image (LIBERO stores images rotated by 180 degrees)")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_cli(build_parser(), convert, argv)


if __name__ == "__main__":
    main()
