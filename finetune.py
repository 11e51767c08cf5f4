"""Robot finetuning entry point: `python finetune.py fit --config configs/finetune.yaml` (same as `lightning fit ...`)."""

from gr.cli import lightning_main

if __name__ == "__main__":
    lightning_main()
