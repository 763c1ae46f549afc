#!/usr/bin/env bash
# The GPU check: tests/test_cuda.py, then tests/benchmark_gpu.py, then a short table. On a machine with an
# NVIDIA GPU, from anywhere, in under 8 minutes on one GPU:
#     bash tests/gpu_check.sh
# It needs what requirements.txt names. A GPU box without a package index can take wheels: put them in .whl/
# at the repository root and they are installed into a private folder first. The lent H100 / H200 machines
# (torch 2.11, transformers 5.17) lack only jsonlines; on a machine with pip access, from the repository root:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl jsonlines==4.0.0
# Logs, the benchmark's files and the table go to gpu_check/ (or $GPU_CHECK_DIR). Exit code 0: all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${GPU_CHECK_DIR:-gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
tests_seconds=$((SECONDS - start))
"$python" tests/benchmark_gpu.py --out "$out/benchmark" 2>&1 | tee "$out/benchmark.log"
benchmark=${PIPESTATUS[0]}
echo
echo "## GPU check, $(date -u +%Y-%m-%d)"
echo
echo "| step | result |"
echo "| --- | --- |"
echo "| tests/test_cuda.py | $(tail -n 1 "$out/test_cuda.log") (exit $tests, ${tests_seconds} s) |"
echo "| tests/benchmark_gpu.py | exit $benchmark |"
echo "| whole check | $((SECONDS - start)) s |"
echo
[ -f "$out/benchmark/table.md" ] && cat "$out/benchmark/table.md"
exit $((tests || benchmark))
