#!/usr/bin/env bash
# One run on a GPU machine (CUDA 13 or 12, PyTorch, no TensorFlow): builds _C
# without TensorFlow, prints what the GPU runtime found, runs tests/gpu, runs
# the GPU benchmarks, and prints a short table last.
#   bash benchmarks/gpu_run.sh            (QUICK=1 for the short benchmark sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/gpu}
PY=${PYTHON:-python}
set -e
cmake -S . -B "$BUILD" -DTFA_BUILD_TF_OPS=OFF -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
  $(command -v ninja >/dev/null && echo -G Ninja) >/dev/null
cmake --build "$BUILD" --target _C -j "$(nproc)"
set +e
export TFA_C_PATH=$(ls "$PWD/$BUILD"/_C*.so | head -1)
export TF_FASTATTN_CACHE_DIR=${TF_FASTATTN_CACHE_DIR:-$PWD/$BUILD/kernel-cache}
$PY - <<'PY'
import importlib.util, os
spec = importlib.util.spec_from_file_location("_C", os.environ["TFA_C_PATH"]); C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C); info = C.gpu_runtime_info()
print({k: info[k] for k in ("ok", "reason", "driver", "nvrtc", "nvrtc_version", "cache_dir")})
PY
$PY -m pytest tests/gpu --confcutdir=tests/gpu -q -rfs -p no:cacheprovider --junitxml="$BUILD/gpu-tests.xml"
tests_status=$?
cd benchmarks
$PY bench_gpu_layer_norm.py --json "../$BUILD/bench_layer_norm.json"
$PY bench_gpu_attention.py --json "../$BUILD/bench_attention.json" ${QUICK:+--quick}
cd ..
$PY benchmarks/gpu_summary.py "$BUILD"
exit $tests_status
