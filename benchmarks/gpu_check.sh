#!/usr/bin/env bash
# What issue 4 measures on a GPU machine, in stages that each fit one device call (10 minutes):
#
#   bash benchmarks/gpu_check.sh tests              # tests/test_engine_cuda.py (about 2.5 min on an H100)
#   bash benchmarks/gpu_check.sh head               # benchmarks/head_kernel.py (under 1 min)
#   bash benchmarks/gpu_check.sh engine MODEL...    # engine_throughput.py per model (SmolLM2 ~2.5 min, Gemma ~4)
#   bash benchmarks/gpu_check.sh conditioning       # tests/test_conditioning_cuda.py, then memory and adapt
#                                                   # over a 1 MB X (250k tokens): time, tokens/s, peak memory
#   bash benchmarks/gpu_check.sh all                # conditioning, the CUDA engine tests, SmolLM2's engine
#                                                   # (about 6 minutes in all; each stage has its timeout)
#
# Results go to $OUT (the device tool's folder) or benchmarks/results/latest: logs, one JSON per
# model, and the printed tables. Random weights with the real shapes (the weights do not travel).
# Wheels carried in .whl/ (e.g. the transformers version the CPU tests use; that machine has no
# registry) are installed to /tmp/site first and put ahead of the image's packages. Build .whl/ here
# (the image's python3 is 3.12 and lacks pydantic, pydantic-settings and zstandard), then run with
# carry [".whl"]:
#   pip download -d .whl --no-deps --python-version 3.12 --only-binary=:all: --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 transformers==5.24.0 pydantic \
#     pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types zstandard
set -u
out=${OUT:-benchmarks/results/latest}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
stage=${1:-}
shift || true
case "$stage" in
tests)
    timeout 200 python3 -m pytest --noconftest -q -s -p no:cacheprovider tests/test_engine_cuda.py 2>&1 |
        tee "$out/cuda_tests.log" | grep -v '^W[0-9]' | tail -25
    ;;
head)
    timeout 120 python3 benchmarks/head_kernel.py 2>&1 | tee "$out/head_kernel.txt"
    ;;
engine)
    for model in "${@:-smollm2-135m}"; do
        timeout 280 python3 benchmarks/engine_throughput.py --device cuda --model "$model" --random-weights --json \
            >"$out/$model.json" 2>"$out/$model.err" || { echo "$model: failed or timed out"; tail -5 "$out/$model.err"; }
        python3 -c "import json,sys; sys.path.insert(0, 'benchmarks'); from engine_throughput import table
print(table(json.load(open(sys.argv[1]))))" "$out/$model.json" 2>/dev/null | tee "$out/$model.txt"
    done
    ;;
conditioning)
    timeout 150 python3 -m pytest --noconftest -q -s -p no:cacheprovider tests/test_conditioning_cuda.py 2>&1 |
        tee "$out/conditioning_tests.log" | grep -v '^W[0-9]' | tail -15
    timeout 150 python3 benchmarks/conditioning.py speed --random-weights --device cuda --x-bytes 1000000 \
        --json "$out/conditioning_speed.json" 2>&1 | tee "$out/conditioning_speed.txt" | grep -v "it/s" | tail -12
    ;;
all)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    bash "$0" conditioning
    bash "$0" tests
    bash "$0" engine smollm2-135m
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh tests | head | engine [MODEL...] | conditioning | all" >&2
    exit 2
    ;;
esac
