#!/usr/bin/env bash
# Three minutes of Tiny Shakespeare on one CUDA GPU: the best validation loss charlm reaches, to set beside
# nanoGPT's shakespeare_char anchor (1.4697 in about 3 minutes on an A100).
#
#   bash bench/gpu.sh [CORPUS] [extra charlm train flags...]
#
# A GPU runs the fused cuDNN LSTM at a batch a CPU could not afford, so the size and regularisation here
# differ from the CPU defaults: a 3 x 1024 LSTM, 256 streams of 256 characters, dropout 0.3, bf16 autocast.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-../shared/data/tinyshakespeare.txt}
shift || true
python=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)/gpu-run
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$python" -m charlm train "$corpus" --device cuda --precision bf16 --max-time 3m \
    --cell lstm --hidden 1024 --layers 3 --dropout 0.3 --batch-size 256 --seq-len 256 --lr 3e-3 \
    --warmup 100 --eval-every 100 --no-preview --out "$out" "$@"
"$python" -m charlm info "$out"
"$python" -m charlm sample -c "$out" --seed 1 --length 400 --prime "ROMEO:"
