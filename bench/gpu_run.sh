#!/usr/bin/env bash
# The GPU measurements of the scale work, as one command on a CUDA machine with gr installed (pip install -e '.[gpu,scale]'):
#   bash bench/gpu_run.sh
# Pretrains presets S and B on synthetic pre-tokenized batches (256 px -> 16x16 codes, 2 history frames, CLIP ViT-B-32
# text tower online) with bf16-mixed under DeepSpeed ZeRO-2, then B with torch.compile, then peak memory per strategy.
# Writes JSON with the date, GPU and versions to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
GPUS=${GPUS:-1}
gpu=$($PY -c "import re, torch; n = torch.cuda.get_device_name(0); m = re.search(r'H100|H200|A100|L40S|A10G|4090', n); print((m.group(0) if m else 'gpu').lower())")
day=$(date +%Y-%m-%d)
out=bench/results
$PY bench/train_throughput.py --device cuda --devices "$GPUS" --presets S B --strategy deepspeed_stage_2 \
    --precision bf16-mixed --batch-size 32 --grid 16 --steps 30 --out "$out/train_throughput-$gpu-ds2-bf16-$day.json"
$PY bench/train_throughput.py --device cuda --devices "$GPUS" --sections lightning --presets B --strategy deepspeed_stage_2 \
    --precision bf16-mixed --batch-size 32 --grid 16 --steps 30 --compile \
    --out "$out/train_throughput-$gpu-ds2-bf16-compile-$day.json"
$PY bench/memory.py --device cuda --nproc "$GPUS" --preset B --grid 16 --batch-size 16 --precision bf16 \
    --out "$out/memory-B-$gpu-$day.json"
