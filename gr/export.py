"""Portable export: `gr export CKPT OUT_DIR` and loading the folder back without Lightning.

An export folder holds
- `model.safetensors`: the GR model's weights (trunk, embeddings, heads) and, for robot models, the normalization
  statistics. The frozen encoders are not in it: they are referenced (and by default bundled, see below);
- `config.json`: the module's full hyper-parameters (model, encoders, optimizer, loss), the dataset statistics, the
  references to the frozen encoders with fingerprints that a load checks, provenance (source checkpoint kind, step,
  pretraining checkpoint), the data the run was configured with and eval results when known, and sizes;
- `README.md`: a model card written from the same facts;
- `encoders/`: the frozen VQGAN (taming layout as `.safetensors` + yaml) and the CLIP weights file when the run used
  one. Seeded random encoders are referenced by architecture + seed and fingerprint; `--reference-encoders` writes
  the training run's paths instead of copying the files.

What `gr export` reads: a Lightning `.ckpt` file, a DeepSpeed ZeRO-2/3 checkpoint folder (Lightning's layout: tag
`checkpoint`, the Lightning state as client state), or a torch.distributed.checkpoint folder (FSDP2 /
ModelParallelStrategy with `save_distributed_checkpoint: true`: `.metadata`, `*.distcp`, `meta.pt`). Sharded ones are
consolidated on the CPU in one process. None of them runs code from the files: `.ckpt` and DeepSpeed files go
through gr.safe_load's unpickler, and a DCP `.metadata` pickle is read by an unpickler that knows only DCP's metadata
classes (torch itself would `pickle.load` it).

`load_export(folder)` rebuilds the model as an `ExportedModule` (GR model + frozen encoders + statistics) from these
files: no Lightning import, no Trainer. `GRPolicy.from_pretrained`, `gr rollout` and `gr eval` take the folder
wherever they take a `.ckpt`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any, Optional

import torch
from torch import nn

from gr.config import ClipSpec, GRModelConfig, ImageTokenizerConfig, RobotConfig, TextEncoderConfig, as_config

FORMAT, FORMAT_VERSION = "gr-export", 1
WEIGHTS, CONFIG, CARD, ENCODERS = "model.safetensors", "config.json", "README.md", "encoders"
FROZEN_PREFIXES = ("text_encoder.", "image_tokenizer.")  # never exported as weights: referenced instead
STATS_ROWS = ("mean", "std", "min", "max")
EXPORTABLE = {"gr.training.pretrain.PretrainModule": "pretrain", "gr.training.finetune.FinetuneModule": "finetune"}
DS_TAG = "checkpoint"  # Lightning's DeepSpeedStrategy saves under this tag
DS_PREFIXES = ("_forward_module.", "module.")  # Lightning's wrapper / DDP-style prefixes in DeepSpeed state dicts


def stats_from_buffers(state: torch.Tensor, action: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """{"state"|"action": {"mean", "std", "min", "max": [...]}} from the (4, D) statistics buffers."""
    to = lambda b: dict(zip(STATS_ROWS, b.tolist()))  # noqa: E731
    return {"state": to(state), "action": to(action)}


def is_export(path: str) -> bool:
    """True for a folder written by `gr export` (its config.json says format gr-export)."""
    cfg = os.path.join(path, CONFIG)
    if not (os.path.isdir(path) and os.path.isfile(cfg)):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Reading training checkpoints: one file, or a sharded folder consolidated on the CPU
# ---------------------------------------------------------------------------------------------------------------------

def checkpoint_kind(path: str) -> str:
    """"lightning" (a .ckpt file), "deepspeed" (ZeRO folder), "dcp" (torch.distributed.checkpoint folder) or "export"
    (a `gr export` folder). A ValueError names the path when it is none of these."""
    if os.path.isfile(path):
        return "lightning"
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint not found: {path!r}")
    if is_export(path):
        return "export"
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "dcp"
    if glob.glob(os.path.join(path, "*", "mp_rank_*_model_states.pt")):
        return "deepspeed"
    raise ValueError(f"{path!r}: a folder that is neither a gr export (config.json), a DeepSpeed checkpoint "
                     "(<tag>/mp_rank_00_model_states.pt) nor a torch.distributed.checkpoint folder (.metadata)")


def read_training_checkpoint(path: str) -> dict[str, Any]:
    """The Lightning checkpoint dict of `path` (a .ckpt file, a DeepSpeed folder or a DCP folder), with `state_dict`
    holding whole tensors on the CPU and `checkpoint_kind` set. Runs no code from the files."""
    from gr.safe_load import load_checkpoint

    kind = checkpoint_kind(path)
    if kind == "export":
        raise ValueError(f"{path!r} is already a gr export folder (load it with gr.export.load_export)")
    if kind == "lightning":
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError(f"{path!r}: not a Lightning checkpoint (no state_dict)")
    elif kind == "deepspeed":
        ckpt = _read_deepspeed(path)
    else:
        ckpt = _read_dcp(path)
    ckpt["checkpoint_kind"] = kind
    return ckpt


class _SafeTorch:
    """`torch` as DeepSpeed's zero_to_fp32 sees it, except that `load` goes through gr.safe_load's unpickler: that
    script loads its files with `weights_only=False`, which would run any callable a file names."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, mmap=None, **kwargs):  # noqa: ARG004 - torch.load's signature
        from gr.safe_load import load_checkpoint

        return load_checkpoint(f, map_location=map_location or "cpu")


@contextlib.contextmanager
def _safe_zero_to_fp32():
    import deepspeed.utils.zero_to_fp32 as z

    saved = z.torch
    z.torch = _SafeTorch()
    try:
        yield z
    finally:
        z.torch = saved


def _read_deepspeed(folder: str) -> dict[str, Any]:
    """Consolidate a ZeRO-2/3 folder with DeepSpeed's own zero_to_fp32 (fp32 master weights), on the CPU."""
    from gr.safe_load import load_checkpoint

    tag_file = os.path.join(folder, "latest")
    if os.path.isfile(tag_file):
        with open(tag_file) as f:
            tag = f.read().strip()
    else:
        tags = sorted(os.path.basename(os.path.dirname(p))
                      for p in glob.glob(os.path.join(folder, "*", "mp_rank_00_model_states.pt")))
        tag = DS_TAG if DS_TAG in tags else (tags[-1] if tags else DS_TAG)
    states = os.path.join(folder, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise ValueError(f"{folder!r}: DeepSpeed checkpoint has no {tag}/mp_rank_00_model_states.pt")
    client = load_checkpoint(states)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with _safe_zero_to_fp32() as z:
        try:
            full = z.get_fp32_state_dict_from_zero_checkpoint(folder, tag=tag)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise ValueError(f"{folder!r}: cannot consolidate the DeepSpeed checkpoint (tag {tag!r}): {exc}") from exc
    state = {}
    for key, value in full.items():
        for prefix in DS_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value.detach().cpu().contiguous()
    skip = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
            "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
            "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
            "ds_version"}
    ckpt = {k: v for k, v in client.items() if k not in skip} if isinstance(client, dict) else {}
    ckpt["state_dict"] = state
    return ckpt


# The only globals a torch.distributed.checkpoint `.metadata` pickle may name: DCP's metadata dataclasses and enum,
# torch sizes, dtypes and layouts (`_get_layout` maps a name such as "torch.strided" to the layout), the checkpoint id's
# path class, plain containers. Constructing any of these with arguments from the file runs no other code.
_DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        from gr.safe_load import _safe_global

        found = _safe_global(module, name)
        if found is not None:
            return found
        if (module, name) in _DCP_GLOBALS:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"names {module}.{name}, which is not checkpoint metadata")


def _read_dcp(folder: str) -> dict[str, Any]:
    """Consolidate a torch.distributed.checkpoint folder (Lightning's sharded FSDP2 layout) on the CPU, model weights
    only. torch's own reader unpickles `.metadata` with plain pickle and loads byte entries with weights_only=False;
    here the metadata is unpickled once, by an unpickler that knows only the classes above, and byte entries go through
    gr.safe_load."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from gr.safe_load import load_checkpoint

    meta_path = os.path.join(folder, ".metadata")
    try:
        with open(meta_path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path!r}: refusing the checkpoint metadata: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{meta_path!r}: refusing the checkpoint metadata: a {type(metadata).__name__}, not Metadata")

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = load_checkpoint(value)  # tensors and plain values; any other global is inert
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    full: dict[str, Any] = {}
    try:
        _load_state_dict(full, storage_reader=Reader(folder), planner=Planner(keys=["state_dict"]), no_dist=True)
    except (OSError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{folder!r}: cannot read the distributed checkpoint: {exc}") from exc
    meta_file = os.path.join(folder, "meta.pt")  # Lightning's: everything but the model and optimizer states
    ckpt = dict(load_checkpoint(meta_file)) if os.path.isfile(meta_file) else {}
    if not isinstance(full.get("state_dict"), dict):
        raise ValueError(f"{folder!r}: the distributed checkpoint has no 'state_dict' entry (keys: {sorted(full)[:5]})")
    ckpt["state_dict"] = {k: v.contiguous() if isinstance(v, torch.Tensor) else v
                          for k, v in full["state_dict"].items()}
    return ckpt


# ---------------------------------------------------------------------------------------------------------------------
# The exported module: a GR model with its frozen encoders, built without Lightning
# ---------------------------------------------------------------------------------------------------------------------

class ExportedModule(nn.Module):
    """What `load_export` returns: the attributes that GRPolicy and `gr rollout` use from a training module (`model`,
    `text_encoder`, `image_tokenizer`, `clip_spec`, `robot_spec`, `tokens_spec`, `normalization_stats()`).

    Args:
        hyper_parameters: the training module's `model`, `text_encoder` and `image_tokenizer` configs (plain dicts).
    """

    def __init__(self, hyper_parameters: dict[str, Any]):
        super().__init__()
        from gr.encoders import FrozenTextEncoder, FrozenVQGAN
        from gr.model import GRModel

        self.model_cfg = as_config(GRModelConfig, hyper_parameters["model"], "model")
        text_cfg = as_config(TextEncoderConfig, hyper_parameters["text_encoder"], "text_encoder")
        image_cfg = as_config(ImageTokenizerConfig, hyper_parameters["image_tokenizer"], "image_tokenizer")
        self.text_encoder = FrozenTextEncoder(text_cfg, max_tokens=self.model_cfg.max_text_tokens)
        self.image_tokenizer = FrozenVQGAN(image_cfg)
        grid = self.image_tokenizer.grid_size(self.model_cfg.clip.image_size)
        self.model = GRModel(self.model_cfg, self.image_tokenizer.codebook_size, grid, self.text_encoder.feature_dim)
        robot = self.model_cfg.robot
        if robot is not None:
            self.register_buffer("stats_state", torch.full((4, robot.state_dim), float("nan")))
            self.register_buffer("stats_action", torch.full((4, robot.action_dim), float("nan")))

    @property
    def clip_spec(self) -> ClipSpec:
        return self.model_cfg.clip

    @property
    def robot_spec(self) -> Optional[RobotConfig]:
        return self.model_cfg.robot

    @property
    def tokens_spec(self) -> dict:
        return self.image_tokenizer.tokens_spec(self.model_cfg.clip.image_size)

    def normalization_stats(self) -> dict[str, Any]:
        if self.robot_spec is None:
            raise ValueError("a text-video model has no normalization statistics")
        return stats_from_buffers(self.stats_state, self.stats_action)

    def weights(self) -> dict[str, torch.Tensor]:
        """The exported tensors: everything but the frozen encoders."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def load_weights(self, weights: dict[str, torch.Tensor], where: str) -> None:
        own = self.weights()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            bad = (missing or unexpected)[0]
            raise ValueError(f"{where}: weights do not fit the model config: first bad key {bad!r} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{where}: {k!r} has shape {tuple(v.shape)}, the config gives {tuple(own[k].shape)}")
        self.load_state_dict(weights, strict=False)


def text_tower_fingerprint(encoder) -> str:
    """A short hash of the text tower's weights: a load checks it, so an export never runs with other CLIP weights
    (another file, or another open_clip version's random init)."""
    h = hashlib.sha256()
    for key, value in sorted(encoder.text.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------

def export(checkpoint: str, out_dir: str, bundle_encoders: bool = True, eval_json: Optional[str] = None,
           run_config: Optional[str] = None, overwrite: bool = False, merge_lora: bool = False) -> dict[str, Any]:
    """Write the export folder for `checkpoint` (a .ckpt, a DeepSpeed folder or a DCP folder); returns config.json.

    Args:
        checkpoint: a gr pretraining or finetuning checkpoint.
        out_dir: the folder to write (written to a temporary sibling, then renamed: never half-written).
        bundle_encoders: copy the frozen encoders' weight files into `encoders/` (else reference the run's paths).
        eval_json: a `gr eval` report to put in the card (default: an eval.json beside the run that names this
            checkpoint, if one exists).
        run_config: the LightningCLI config.yaml of the run, for the card's data section (default: found beside the
            checkpoint's run folder).
        overwrite: replace an existing non-empty `out_dir`.
        merge_lora: for a LoRA finetuning checkpoint: rebuild it over its base, fold the adapters into the weights
            and export the plain model (required for such checkpoints: an export holds one set of weights).
    """
    from safetensors.torch import save_file

    from gr.safe_load import resolve_class_path

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"OUT_DIR {out_dir!r} exists and is not empty (pass --overwrite to replace it)")
        if not is_export(out_dir):  # --overwrite replaces an earlier export, never a run folder or anything else
            raise ValueError(f"OUT_DIR {out_dir!r} is not a gr export folder (no config.json of format {FORMAT!r}): "
                             "--overwrite only replaces an earlier export")
    inside = os.path.abspath(checkpoint).startswith(os.path.join(os.path.abspath(out_dir), ""))
    if inside or os.path.abspath(checkpoint) == os.path.abspath(out_dir):
        raise ValueError(f"OUT_DIR {out_dir!r} holds the checkpoint {checkpoint!r}: choose another folder")
    ckpt = read_training_checkpoint(checkpoint)
    hp = dict(ckpt.get("hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    if class_path is None:
        raise ValueError(f"{checkpoint!r}: not a gr checkpoint (hyper_parameters lack _class_path)")
    resolve_class_path(class_path, checkpoint)  # refuses anything but gr's modules, before anything is built
    if class_path not in EXPORTABLE:
        raise ValueError(f"{checkpoint!r}: a {class_path.rpartition('.')[2]} checkpoint is not exported by gr export "
                         "(a tokenizer's export is its taming .ckpt + yaml, written by its training)")
    from gr.training.checkpoint_io import weights_already_in_checkpoint

    weights_already_in_checkpoint(hp)  # init_from becomes pretrained_from: an export never reads it again
    state_dict = ckpt["state_dict"]
    if hp.get("lora"):
        if not merge_lora:
            raise ValueError(f"{checkpoint!r} is a LoRA checkpoint (adapters over {hp.get('lora_base')!r}): pass "
                             "--merge-lora to export the merged weights")
        from gr.model.lora import merge_lora as merge
        from gr.training.checkpoint_io import module_from_checkpoint

        adapted = module_from_checkpoint(checkpoint)  # the base from lora_base, then the checkpoint's tensors
        merge(adapted.model)
        adapted.lora_base_keys = set()  # the merged model's state dict is whole again
        state_dict = adapted.state_dict()
        hp["merged_lora"] = {"lora": hp["lora"], "base": hp["lora_base"]}
    hp.pop("lora", None)
    hp.pop("lora_base", None)
    module = ExportedModule(hp)
    weights = {k: v for k, v in state_dict.items() if not k.startswith(FROZEN_PREFIXES)}
    module.load_weights(weights, checkpoint)
    module.eval()
    if module.robot_spec is not None and torch.isnan(module.stats_state).any():
        raise ValueError(f"{checkpoint!r}: the robot model has no normalization statistics (stats_state is NaN)")

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        encoders = _write_encoders(module, hp, tmp, bundle_encoders)
        # safetensors refuses tensors sharing storage (tied weights): every tensor is written as its own copy.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.weights().items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        config = _config_json(module, hp, class_path, ckpt, checkpoint, encoders, eval_json, run_config, tensors)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, CARD), "w") as f:
            f.write(model_card(config))
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return config


def _write_encoders(module: ExportedModule, hp: dict[str, Any], folder: str, bundle: bool) -> dict[str, Any]:
    """Rewrite `hp`'s encoder paths (bundled: relative to the export folder) and describe each encoder."""
    from safetensors.torch import save_file

    from gr.encoders.vqgan import taming_yaml_dict

    import yaml

    image, text = dict(hp["image_tokenizer"]), dict(hp["text_encoder"])
    vq = module.image_tokenizer.vq
    image_ref: dict[str, Any] = {"codebook_fingerprint": vq.codebook_fingerprint(), "codebook_size": vq.n_embed,
                                 "downsample_factor": vq.downsample_factor}
    if not image.get("checkpoint"):
        image_ref["source"] = "random"
        image_ref["random_init_seed"] = image.get("random_init_seed", 0)
    elif bundle:
        os.makedirs(os.path.join(folder, ENCODERS), exist_ok=True)
        rel_ckpt, rel_yaml = f"{ENCODERS}/vqgan.safetensors", f"{ENCODERS}/vqgan.yaml"
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in vq.state_dict().items()},
                  os.path.join(folder, rel_ckpt))
        with open(os.path.join(folder, rel_yaml), "w") as f:
            yaml.safe_dump(taming_yaml_dict(vq), f, sort_keys=False)
        image_ref.update(source="bundled", trained_from=os.path.basename(image["checkpoint"]))
        image.update(checkpoint=rel_ckpt, yaml=rel_yaml)
    else:
        image["checkpoint"] = os.path.abspath(image["checkpoint"])
        image["yaml"] = os.path.abspath(image.get("yaml") or os.path.splitext(image["checkpoint"])[0] + ".yaml")
        image_ref.update(source="reference", sha256=file_digest(image["checkpoint"]))
    text_ref: dict[str, Any] = {"model_name": text.get("model_name"),
                                "fingerprint": text_tower_fingerprint(module.text_encoder)}
    if not text.get("pretrained"):
        text_ref.update(source="random", random_init_seed=text.get("random_init_seed", 0))
    elif bundle:
        os.makedirs(os.path.join(folder, ENCODERS), exist_ok=True)
        name = os.path.basename(text["pretrained"])
        shutil.copyfile(text["pretrained"], os.path.join(folder, ENCODERS, name))
        text_ref.update(source="bundled", trained_from=name)
        text["pretrained"] = f"{ENCODERS}/{name}"
    else:
        text["pretrained"] = os.path.abspath(text["pretrained"])
        text_ref.update(source="reference", sha256=file_digest(text["pretrained"]))
    hp["image_tokenizer"], hp["text_encoder"] = image, text
    return {"image_tokenizer": image_ref, "text_encoder": text_ref}


def _find_run_file(checkpoint: str, names: tuple[str, ...]) -> Optional[str]:
    """The first of `names` in the checkpoint's folder or up to two folders above it (a run's layout)."""
    here = os.path.dirname(os.path.abspath(checkpoint.rstrip(os.sep)))
    for folder in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _eval_summary(checkpoint: str, eval_json: Optional[str]) -> Optional[dict[str, Any]]:
    path = eval_json or _find_run_file(checkpoint, ("eval.json", os.path.join("eval", "eval.json")))
    if path is None:
        return None
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--eval: cannot read {path!r}: {exc}") from None
    if not isinstance(report, dict) or "tasks" not in report:
        raise ValueError(f"--eval: {path!r} is not a gr eval report (no 'tasks')")
    same = os.path.abspath(str(report.get("checkpoint", ""))) == os.path.abspath(checkpoint)
    if eval_json is None and not same:  # found by looking around: only if it evaluated this very checkpoint
        return None
    return {"mean_success_rate": report.get("mean_success_rate"),
            "episodes_per_task": report.get("episodes_per_task"),
            "tasks": {t: r.get("success_rate") for t, r in report["tasks"].items()},
            "of_this_checkpoint": same}


def _data_summary(checkpoint: str, run_config: Optional[str]) -> Optional[dict[str, Any]]:
    import yaml

    path = run_config or _find_run_file(checkpoint, ("config.yaml",))
    if path is None:
        return None
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--run-config: cannot read {path!r}: {exc}") from None
    data = doc.get("data") or {}
    args = data.get("init_args") or {}
    keep = ("train_shards", "train_sources", "val_shards", "shard_format", "batch_size", "windows_per_episode")
    return {"datamodule": data.get("class_path"), **{k: args[k] for k in keep if args.get(k) is not None},
            "max_steps": (doc.get("trainer") or {}).get("max_steps")}


def _config_json(module: ExportedModule, hp: dict[str, Any], class_path: str, ckpt: dict[str, Any], checkpoint: str,
                 encoders: dict[str, Any], eval_json: Optional[str], run_config: Optional[str],
                 tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = module.model
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    robot = module.robot_spec
    sizes = {"parameters": sum(p.numel() for p in model.parameters()), "trunk_parameters": count("trunk."),
             "action_head_parameters": count("action_head.") if robot else 0,
             "weights_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
             "frozen_text_parameters": sum(p.numel() for p in module.text_encoder.parameters()),
             "frozen_vqgan_parameters": sum(p.numel() for p in module.image_tokenizer.parameters()),
             "image_size": module.clip_spec.image_size, "tokens_per_frame": model.grid_size ** 2,
             "codebook_size": module.image_tokenizer.codebook_size}
    if robot is not None:
        sizes.update(views=list(robot.view_names), state_dim=robot.state_dim, action_dim=robot.action_dim,
                     action_chunk=robot.action_chunk, action_head=robot.head.kind)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "kind": EXPORTABLE[class_path], "class_path": class_path,
        "hyper_parameters": _plain(hp),
        "encoders": encoders,
        "tokens_spec": module.tokens_spec,
        "normalization_stats": module.normalization_stats() if robot is not None else None,
        "source": {"checkpoint": os.path.basename(os.path.abspath(checkpoint.rstrip(os.sep))),
                   "checkpoint_kind": ckpt["checkpoint_kind"], "global_step": ckpt.get("global_step"),
                   "epoch": ckpt.get("epoch"), "pretrained_from": hp.get("pretrained_from"),
                   "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "data": _data_summary(checkpoint, run_config),
        "eval": _eval_summary(checkpoint, eval_json),
        "sizes": sizes,
    }


def _plain(value: Any) -> Any:
    """Hyper-parameters as JSON values (tuples become lists; dataclasses dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_card(config: dict[str, Any]) -> str:
    """The README.md of an export folder, from its config.json."""
    s, src, enc = config["sizes"], config["source"], config["encoders"]
    hp = config["hyper_parameters"]
    trunk = hp["model"]["trunk"]
    out = io.StringIO()
    w = lambda line="": out.write(line + "\n")  # noqa: E731
    w(f"# gr {config['kind']} model ({'policy' if config['kind'] == 'finetune' else 'video world model'})")
    w()
    w(f"Exported by `gr export` from `{src['checkpoint']}` ({src['checkpoint_kind']} checkpoint, step "
      f"{src['global_step']}, epoch {src['epoch']}) at {src['exported_at']}.")
    if src.get("pretrained_from"):
        w(f"Finetuned from the pretraining checkpoint `{os.path.basename(str(src['pretrained_from']))}`.")
    w()
    w("## Model")
    w()
    w(f"- GPT trunk: preset {trunk.get('preset')}, {s['trunk_parameters']:,} parameters; "
      f"{s['parameters']:,} in all (`model.safetensors`, {s['weights_bytes'] / 2**20:.1f} MiB).")
    w(f"- Frames: {s['image_size']} px, {s['tokens_per_frame']} tokens of a {s['codebook_size']}-code VQGAN "
      f"({enc['image_tokenizer']['source']}, codebook fingerprint `{enc['image_tokenizer']['codebook_fingerprint']}`, "
      f"{s['frozen_vqgan_parameters']:,} frozen parameters).")
    w(f"- Text: open_clip `{enc['text_encoder']['model_name']}` text tower ({enc['text_encoder']['source']}, "
      f"fingerprint `{enc['text_encoder']['fingerprint']}`, {s['frozen_text_parameters']:,} frozen parameters).")
    clip = hp["model"]["clip"]
    w(f"- History {clip.get('num_history')} frames; predicts the frame {clip.get('future_frame_offset')} steps ahead.")
    if config["kind"] == "finetune":
        w(f"- Robot: views {', '.join(s['views'])}; state {s['state_dim']} dims; action chunks of "
          f"{s['action_chunk']} x {s['action_dim']} ({s['action_head_parameters']:,}-parameter {s.get('action_head', 'cvae')} head).")
    w()
    w("## Training data")
    w()
    data = config.get("data")
    if data:
        for key, value in data.items():
            if value is not None:
                w(f"- {key}: `{json.dumps(value)}`")
    else:
        w("- Not recorded (no run config.yaml was found beside the checkpoint).")
    w()
    w("## Evaluation")
    w()
    ev = config.get("eval")
    if ev:
        w(f"Closed-loop success, {ev['episodes_per_task']} seeded episodes per task (`gr eval`): mean "
          f"{100 * ev['mean_success_rate']:.1f}%" + ("" if ev["of_this_checkpoint"] else
                                                     " (a report given with --eval, of another checkpoint path)"))
        w()
        w("| Task | Success |")
        w("|---|---|")
        for task, rate in ev["tasks"].items():
            w(f"| {task} | {100 * rate:.0f}% |")
    else:
        w("No evaluation results known to the export.")
    w()
    w("## Use")
    w()
    w("```python")
    w("from gr.policy import GRPolicy")
    w("policy = GRPolicy.from_pretrained('THIS_FOLDER')")
    w("chunk = policy.act({'images': {view: uint8_hwc}, 'state': state, 'instruction': 'open the drawer'})")
    w("```")
    w()
    w("Or `gr eval --checkpoint THIS_FOLDER`, `gr rollout --checkpoint THIS_FOLDER --source ...`.")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

def read_export_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r}: not a gr export folder (no {CONFIG})")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path!r}: not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path!r}: format is {config.get('format') if isinstance(config, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path!r}: format_version {config['format_version']} is newer than this gr reads "
                         f"({FORMAT_VERSION})")
    for key in ("hyper_parameters", "encoders"):
        if key not in config:
            raise ValueError(f"{path!r}: missing field {key!r}")
    return config


def load_export(folder: str, map_location: str | torch.device = "cpu") -> ExportedModule:
    """Rebuild an export folder as an ExportedModule in eval mode, checking the frozen encoders' fingerprints."""
    from safetensors.torch import load_file

    config = read_export_config(folder)
    hp = json.loads(json.dumps(config["hyper_parameters"]))
    for field, key in (("image_tokenizer", "checkpoint"), ("image_tokenizer", "yaml"), ("text_encoder", "pretrained")):
        value = hp[field].get(key)
        if value and not os.path.isabs(value):  # bundled files are relative to the folder
            hp[field][key] = os.path.join(folder, value)
    for field, key in (("image_tokenizer", "checkpoint"), ("text_encoder", "pretrained")):
        value = hp[field].get(key)
        if value and not os.path.isfile(value):
            raise ValueError(f"{folder!r}: config.json hyper_parameters.{field}.{key}: file not found: {value!r}")
    module = ExportedModule(hp)
    enc = config["encoders"]
    got = module.image_tokenizer.vq.codebook_fingerprint()
    if got != enc["image_tokenizer"]["codebook_fingerprint"]:
        raise ValueError(f"{folder!r}: encoders.image_tokenizer: the VQGAN loaded has codebook fingerprint {got}, "
                         f"the model was trained with {enc['image_tokenizer']['codebook_fingerprint']}")
    got = text_tower_fingerprint(module.text_encoder)
    if got != enc["text_encoder"]["fingerprint"]:
        raise ValueError(f"{folder!r}: encoders.text_encoder: the text tower loaded has fingerprint {got}, the model "
                         f"was trained with {enc['text_encoder']['fingerprint']} (other weights, or another open_clip "
                         "version's random init)")
    weights_path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights_path):
        raise ValueError(f"{folder!r}: {WEIGHTS} not found")
    module.load_weights(load_file(weights_path), weights_path)
    return module.to(map_location).eval()


def load_any(path: str, map_location: str = "cpu"):
    """A module from an export folder (ExportedModule), or a training module from a .ckpt / DeepSpeed / DCP folder."""
    if checkpoint_kind(path) == "export":
        return load_export(path, map_location)
    from gr.training.checkpoint_io import module_from_checkpoint

    return module_from_checkpoint(path, map_location)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="gr export", description="Write a portable export folder (model.safetensors, "
                                "config.json, README.md card, encoders/) from a gr checkpoint: a Lightning .ckpt, a "
                                "DeepSpeed ZeRO-2/3 folder or an FSDP2 distributed-checkpoint folder.")
    p.add_argument("checkpoint", metavar="CKPT", help="pretraining or finetuning checkpoint (file or sharded folder)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="export folder to write")
    p.add_argument("--reference-encoders", action="store_true",
                   help="reference the frozen encoders' files by path instead of copying them into encoders/")
    p.add_argument("--eval", dest="eval_json", default=None,
                   help="a gr eval report (eval.json) for the card (default: one beside the run, if it names CKPT)")
    p.add_argument("--run-config", default=None,
                   help="the run's LightningCLI config.yaml, for the card's data section (default: found near CKPT)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA checkpoint: fold its adapters into the base weights and export the merged model")
    args = p.parse_args(argv)
    try:
        config = export(args.checkpoint, args.out_dir, bundle_encoders=not args.reference_encoders,
                        eval_json=args.eval_json, run_config=args.run_config, overwrite=args.overwrite,
                        merge_lora=args.merge_lora)
    except ValueError as exc:
        print(f"gr export: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"out_dir": args.out_dir, "kind": config["kind"], "source": config["source"],
                      "sizes": config["sizes"]}, indent=2))
    return config


if __name__ == "__main__":
    main()
