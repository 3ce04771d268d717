#!/usr/bin/env bash
# ojakv on a CUDA machine: the CPU/CUDA agreement tests, then decode speed of the default ojakv and the methods it
# is compared with, side by side with the full cache, on a Llama-3-8B-shaped model with random weights (bfloat16,
# contexts 8K-32K; the shape decides the speed, not the weights).
#
#   scripts/gpu-bench.sh fetch     here, with pip and network: wheels the GPU image lacks, into .whl/
#   scripts/gpu-bench.sh run       on the CUDA machine (its own torch and transformers are used), from the repo root;
#                                  results in $OUT (or ./gpu-results): bench.json, bench.md, tests.log
#
# The GPU machines lent to this project have PyTorch, Triton and transformers (5.17, inside ojakv's supported
# range) but no network; platformdirs and gguf are carried as wheels (`fetch`), ojakv itself runs from src/.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(platformdirs==4.5.1 gguf==0.19.0)
LENGTHS=${LENGTHS:-8192,16384,32768}
METHODS=${METHODS:-full,ojakv,ojakv:select_tokens=256,ojakv:key_mode=post_rope,ojakv:attention=reconstruct,snapkv,kivi,turboquant}

case "${1:-}" in
fetch)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
run)
    out=${OUT:-gpu-results}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
    python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device';
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
        | tee "$out/tests.log"
    # The CPU/CUDA agreement tests (skipped on machines without CUDA), and the latent-attention equivalences (by
    # node id: a -k filter applies to every file named, and "cuda" would deselect the latent-attention tests).
    python3 -m pytest -q -p no:cacheprovider tests/test_hardening.py::test_cpu_and_cuda_agree \
        tests/test_latent_attention.py 2>&1 | tee -a "$out/tests.log"
    python3 -m ojakv.cli bench --model random-llama3-8b --dtype bfloat16 --device cuda --lengths "$LENGTHS" \
        --methods "$METHODS" --repeats 3 --decode-tokens 64 --json "$out/bench.json" | tee "$out/bench.md"
    ;;
*)
    echo "usage: scripts/gpu-bench.sh fetch|run" >&2
    exit 2
    ;;
esac
