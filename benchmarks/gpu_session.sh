#!/usr/bin/env bash
# Every GPU check of this repo in one command, for a short GPU lease (the machine starts bare, has no
# network, and device time is counted from its start): the CUDA test, our transformer against
# diffusers' at the 13B's width, and the memory planner on the 13B (benchmarks/gpu_13b.py, which
# rewrites docs/memory.md's table). Each step has its own time limit, so that one slow step cannot
# lose the others' output.
#
# On the GPU machine, from the repo root: bash benchmarks/gpu_session.sh OUTDIR
# Packages the GPU machine lacks travel as wheels in .whl/ (git-ignored), fetched beforehand with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# Results of the one run so far: docs/memory.md, "Measured on a GPU".
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"

echo "== the CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_checkpoints.py tests/test_speed.py -k cuda 2>&1 | tee "$out/pytest-cuda.txt" | tail -5

echo "== ours (eager, then compiled) vs diffusers, one forward at the 13B's width (2 dual + 4 single blocks), 640 bucket"
timeout 240 python3 benchmarks/transformer_forward.py --device cuda --dtypes bf16 --warmup 2 --repeats 7 --compile \
  --heads 24 --layers 2 --single-layers 4 --text-embed-dim 4096 --pooled-dim 768 --image-proj-dim 1152 \
  --latent-size 76 80 --text-len 256 --image-tokens 729 --markdown-out "$out/forward-13b-width.md" 2>&1 | tail -6

echo "== the memory planner on the 13B"
timeout 330 python3 benchmarks/gpu_13b.py --time-limit 290 --update-doc docs/memory.md 2>&1 | tee "$out/gpu-13b.txt"
cp docs/memory.md "$out/memory.md"
