#!/usr/bin/env bash
# Three minutes of Tiny Shakespeare on one CUDA GPU: the best validation loss charlm reaches, to set beside
# nanoGPT's shakespeare_char anchor (1.4697 in about 3 minutes on an A100). Then the CUDA tests and the
# throughput and sampling benches on the same device.
#
#   bash bench/gpu.sh [CORPUS] [extra charlm train flags...]
#
# The CI venv (.venv) holds the CPU-only torch wheel. When its torch sees no CUDA device, this script uses a
# second venv, .venv-gpu (created once), with PyPI's default Linux x86_64 torch wheel, which is a CUDA build,
# plus charlm itself in editable mode. PYTHON=/path/to/python skips the search. SKIP_EXTRA=1 runs only the
# training run.
#
# A GPU runs the fused cuDNN LSTM at a batch a CPU could not afford, so the size and regularisation here
# differ from the CPU defaults: a 3 x 1024 LSTM, 256 streams of 256 characters, dropout 0.3, bf16 autocast.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-../shared/data/tinyshakespeare.txt}
shift || true
torch_pin=${TORCH_PIN:-torch==2.13.0}  # the version the project tests; PyPI's Linux wheel of it is a CUDA build

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
    echo "gpu.sh: using PYTHON=$python"
elif [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then
    python=.venv/bin/python
    echo "gpu.sh: .venv's torch sees a CUDA device; using it"
else
    echo "gpu.sh: .venv's torch has no CUDA (the CI venv holds the CPU wheel); using .venv-gpu"
    if [ ! -x .venv-gpu/bin/python ]; then
        echo "gpu.sh: creating .venv-gpu and installing $torch_pin (CUDA build from PyPI, a few GB) and charlm"
        python3 -m venv .venv-gpu
        echo '*' > .venv-gpu/.gitignore  # git leaves the venv alone
    fi
    if ! has_cuda .venv-gpu/bin/python; then
        # PIP_FIND_LINKS emptied: a local wheel folder may hold the CPU build under the same version number.
        PIP_FIND_LINKS= .venv-gpu/bin/pip install --disable-pip-version-check "$torch_pin" -e '.[test]' || {
            echo "gpu.sh: could not install $torch_pin from PyPI (offline?); point PYTHON at a python whose" \
                 "torch has CUDA, with charlm's dependencies" >&2
            exit 1
        }
    fi
    python=.venv-gpu/bin/python
fi
"$python" -c "import torch; print('gpu.sh: torch', torch.__version__, 'CUDA', torch.version.cuda)"
if [ "$("$python" -c 'import torch; print(torch.version.cuda is None)')" = True ]; then
    echo "gpu.sh: $python's torch is a CPU-only build; install a CUDA build there or set PYTHON" >&2
    exit 1
fi
if ! has_cuda "$python"; then
    echo "gpu.sh: $python's torch sees no CUDA device (no GPU here, or a driver too old for this build); stopping" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

out=$(mktemp -d)/gpu-run
echo "gpu.sh: 3-minute Tiny Shakespeare run into $out"
"$python" -m charlm train "$corpus" --device cuda --precision bf16 --max-time 3m \
    --cell lstm --hidden 1024 --layers 3 --dropout 0.3 --batch-size 256 --seq-len 256 --lr 3e-3 \
    --warmup 100 --eval-every 100 --no-preview --out "$out" "$@"
"$python" -m charlm info "$out"
"$python" -m charlm sample -c "$out" --seed 1 --length 400 --prime "ROMEO:"
echo "gpu.sh: the same checkpoint sampled on the CPU (a GPU run resumes and samples anywhere)"
"$python" -m charlm sample -c "$out" --device cpu --seed 1 --length 100 --prime "ROMEO:"

if [ "${SKIP_EXTRA:-0}" != 1 ]; then
    echo "gpu.sh: pytest -m cuda"
    "$python" -m pytest -m cuda -q
    # bench/throughput.py and bench/sampling.py measure the CPU; gpu_bench.py is their GPU counterpart.
    echo "gpu.sh: training throughput against the bare cuDNN kernel, and sampling on the GPU and the CPU"
    "$python" bench/gpu_bench.py
fi
