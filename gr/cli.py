"""Command-line entry points.

- `lightning fit --config configs/pretrain.yaml` (console script `lightning`; lightning 2.6 ships none of its own)
- `gr pretrain fit --config ...` (the same LightningCLI)
- `gr tokenizer fit --config configs/tokenizer.yaml` (VQGAN training/finetuning; also the same LightningCLI)
- `gr finetune fit --config configs/finetune.yaml` (= `python finetune.py fit ...`; robot finetuning)
- `gr eval --checkpoint CKPT` (closed-loop success rate on Meta-World tasks)
- `gr rollout --checkpoint CKPT --source SHARDS` (predicted frames beside the ground truth, metrics)
- `gr export CKPT OUT_DIR` (model.safetensors + config.json + model card; takes sharded DeepSpeed/FSDP2 folders)
- `gr serve --checkpoint CKPT_OR_EXPORT --port N` (the policy over a websocket; client: gr/client.py, no torch)
- `gr report RUN_DIR` (one self-contained report.html: curves, rollouts, eval, config)
- `gr experiment --pretrained CKPT --pretrain-includes-target-tasks {yes,no}` (pretrained vs scratch finetuning)
- `gr demo` (the embedded end-to-end demo), `gr presets` (trainable parameter counts of S/B/L/XL)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

os.environ.setdefault("WANDB_MODE", "offline")  # wandb needs an explicit opt-in to go online
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a model hub at run time


def _make_cli_class():
    import lightning as L
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from gr.training.checkpoint_io import AtomicCheckpointIO

    class GRLightningCLI(LightningCLI):
        """LightningCLI with class_path/init_args for model and data, and atomic checkpoint writes by default."""

        def _parse_ckpt_path(self) -> None:
            """On `--ckpt_path`, take the model's init args from the checkpoint (as LightningCLI does), passing
            them as `init_args` of the module's class path: the stock code assumes non-subclass mode here."""
            from gr.config import ConfigError
            from gr.safe_load import load_checkpoint, resolve_class_path
            from gr.training.checkpoint_io import weights_already_in_checkpoint

            sub = self.config.get("subcommand")
            ckpt_path = self.config[sub].get("ckpt_path") if sub else None
            if not ckpt_path or not os.path.isfile(ckpt_path):
                return
            hparams = load_checkpoint(ckpt_path).get("hyper_parameters", {})
            class_path = hparams.pop("_class_path", None)
            if class_path is None:
                return super()._parse_ckpt_path()
            try:  # before jsonargparse imports whatever the file names
                resolve_class_path(class_path, ckpt_path)
            except ValueError as exc:
                raise ConfigError(f"ckpt_path: {exc}") from None
            weights_already_in_checkpoint(hparams)  # a resumed finetune never re-reads init_from
            update = {sub: {"model": {"class_path": class_path, "init_args": hparams}}}
            self.config = self.parser.parse_object(update, self.config)

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            strategy = trainer.strategy
            if type(getattr(strategy, "_checkpoint_io", None) or TorchCheckpointIO()) is TorchCheckpointIO:
                strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

    return GRLightningCLI, L


def run_lightning_cli(args: Optional[list[str]] = None, run: bool = True):
    """Run the LightningCLI over our modules; returns the CLI object (its `.trainer`, `.model`)."""
    from gr.config import ConfigError

    cli_cls, L = _make_cli_class()
    try:
        return cli_cls(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=args, run=run, save_config_kwargs={"overwrite": True},
                       )
    except ValueError as exc:
        msg = config_error_message(exc)
        if msg is None:
            raise
        print(f"gr: config error: {msg}", file=sys.stderr)  # a user mistake: one clear line, no traceback
        raise SystemExit(2) from None


def config_error_message(exc: BaseException) -> Optional[str]:
    """The user-facing message of a config mistake, or None for anything else (which then propagates).

    jsonargparse wraps errors raised while it instantiates classes into a "Does not validate against any of the
    Union subtypes" ValueError that lists each subtype's error; ours is the one naming a field.
    """
    from gr.config import ConfigError

    seen = exc
    while seen is not None:
        if isinstance(seen, ConfigError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    if "Errors:" in text:
        errors = [line.strip()[2:] for line in text.split("Errors:", 1)[1].splitlines() if line.strip().startswith("- ")]
        errors = [e for e in errors if not e.startswith("Expected a <class 'NoneType'>")]
        if errors:
            return errors[0]
    return None


def lightning_main() -> None:
    """The `lightning` console script: `lightning fit --config configs/pretrain.yaml`."""
    run_lightning_cli(None)


def _presets() -> None:
    import torch

    from gr.config import PRESET_TARGETS, ClipSpec, GRModelConfig, TrunkConfig
    from gr.model import GRModel

    rows = {}
    for name, target in PRESET_TARGETS.items():
        with torch.device("meta"):
            m = GRModel(GRModelConfig(trunk=TrunkConfig(preset=name), clip=ClipSpec(image_size=256)), 1024, 16, 512)
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        rows[name] = {"trainable": n, "target": int(target), "ratio": round(n / target, 4)}
    print(json.dumps(rows, indent=2))


# Subcommands that are a module's own argparse CLI: name -> (module with main(argv), help line).
TOOLS = {
    "eval": ("gr.evaluate", "closed-loop success rate on Meta-World: gr eval --checkpoint CKPT"),
    "rollout": ("gr.rollout", "generate future frames beside the ground truth: gr rollout --checkpoint CKPT "
                "--source SHARDS"),
    "experiment": ("gr.experiment", "pretrained vs scratch finetuning at several demo counts: gr experiment "
                   "--pretrained CKPT --pretrain-includes-target-tasks {yes,no}"),
    "experiment-grid": ("gr.experiment_grid", "action heads x {full, LoRA} x {co-training} x {augmentation} on one "
                        "benchmark: gr experiment-grid --pretrained CKPT --pretrain-includes-target-tasks {yes,no}"),
    "export": ("gr.export", "portable export folder (model.safetensors, config.json, README card): gr export "
               "CKPT OUT_DIR"),
    "serve": ("gr.serve", "policy server over a websocket (msgpack): gr serve --checkpoint CKPT --port N"),
    "report": ("gr.report", "self-contained report.html of a run: gr report RUN_DIR"),
}


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="gr", description="GR-2-style video-generative robot policies")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pretrain", help="LightningCLI for pretraining: gr pretrain fit --config configs/pretrain.yaml",
                   add_help=False)
    sub.add_parser("tokenizer", help="LightningCLI for the VQGAN: gr tokenizer fit --config configs/tokenizer.yaml",
                   add_help=False)
    d = sub.add_parser("demo", help="run the embedded end-to-end demo")
    d.add_argument("--out", default="outputs/demo")
    sub.add_parser("presets", help="print trainable parameter counts of the S/B/L/XL presets")
    sub.add_parser("finetune", help="LightningCLI for robot finetuning: gr finetune fit --config configs/finetune.yaml",
                   add_help=False)
    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    if argv and argv[0] in TOOLS:  # each tool parses its own arguments (and --help)
        import importlib

        importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
        return
    if argv and argv[0] in ("pretrain", "tokenizer", "finetune"):  # all the LightningCLI; the config picks the module
        run_lightning_cli(argv[1:])
        return
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from gr.demo import main as demo_main

        demo_main(["--out", args.out])
    elif args.cmd == "presets":
        _presets()


if __name__ == "__main__":
    main()
