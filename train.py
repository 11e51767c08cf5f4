"""Pretraining entry point: `python train.py fit --config configs/pretrain.yaml` (same as `lightning fit ...`)."""

from gr.cli import lightning_main

if __name__ == "__main__":
    lightning_main()
