#!/usr/bin/env bash
# Issue 17's GPU measurements in one run of about 8 minutes, from the project root on a CUDA machine.
# A user needs JAX's CUDA build, this project's requirements and, for vs_pytorch, torch in the interpreter
# TORCH_PYTHON names (default python3); then `bash benchmarks/gpu_suite.sh` (OUT=... sets where results go).
# Developer note: ../shared/gpu is the maintainers' GPU kit, beside this repository and not part of it (a
# user's checkout has no ../shared). On an offline lent GPU the maintainers run:
#   bash ../shared/gpu/prepare.sh                      # here, with package access: fills the ignored .gpu/
#   run: command "bash benchmarks/gpu_suite.sh", carry [".gpu"], timeout_s 590; then give_back
# It installs .gpu/whl (the kit's wheels) into /tmp/site unless they import already, then runs, each under a timeout
# so that one hang cannot eat the rest: the side-by-side with PyTorch at batch 128/512/2048, the default step's
# profile, both GRUs on the default and VSE++ steps, evaluation at COCO-5K size, float32 vs bfloat16, and the
# default experiment by stage. Everything goes to $OUT/log.txt and the JSON lines to $OUT/*.jsonl.
# Dry run on a CPU machine (the same commands at smoke sizes, PyTorch from TORCH_PYTHON):
#   PLATFORM=cpu SMOKE=1 TORCH_PYTHON=/path/to/venv/bin/python bash benchmarks/gpu_suite.sh
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
PLATFORM=${PLATFORM:-cuda}
export JAX_PLATFORMS=$PLATFORM
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
size=""; [ -n "${SMOKE:-}" ] && size="--smoke"
torch_python=${TORCH_PYTHON:-python3}
torch_device=$([ "$PLATFORM" = cuda ] && echo cuda || echo cpu)

if [ "$PLATFORM" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  if ! python3 -c "import flax, optax, scann, tensorflow_datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" || exit 1

step() {  # step NAME SECONDS COMMAND...: runs it, keeps its JSON lines in $OUT/NAME.jsonl
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2>&1; local rc=$?
  grep '^{' "$OUT/$name.out" > "$OUT/$name.jsonl"
  grep -v '^{' "$OUT/$name.out" | grep -E '^\||^[a-z].* ms|rror' | head -60
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
}

step vs_pytorch 150 python3 -m benchmarks.vs_pytorch --torch_python="$torch_python" --device="$torch_device" \
  --batch_sizes=128,512,2048 --rounds=1 $size
step profile_default 60 python3 -m benchmarks.profile_step --setup=default --top=40 --trace_dir="$OUT/trace_default" $size
step profile_vsepp 60 python3 -m benchmarks.profile_step --setup=vsepp --top=40 --trace_dir="$OUT/trace_vsepp" $size
step gru_impls 120 python3 -m benchmarks.train_throughput --setups=default,vsepp --devices=1 --gru_impl=scan,packed $size
step eval_speed 60 python3 -m benchmarks.eval_speed --loop_images=20 $size
step mixed_precision 60 python3 -m benchmarks.mixed_precision --parts=speed $size
rm -rf /tmp/gpu_suite_e2e
step end_to_end 100 python3 -m benchmarks.end_to_end --workdir=/tmp/gpu_suite_e2e $size
echo "== done; JSON lines in $OUT"
