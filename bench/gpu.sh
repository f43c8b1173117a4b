#!/usr/bin/env bash
# The SGD step of crl_deep on a GPU in one call of under 10 minutes: depths 64, 256, 1024 at batch 512 on
# humanoid's sizes; scan vs partial unroll (2, 8) vs a Python loop of blocks (depth 64) vs bfloat16 matmuls;
# rate, XLA's memory estimate and the device's peak memory. Needs only jax, flax and optax (no brax, no
# mujoco): it runs on a machine's own preinstalled jax. JSON lines go to $OUT/crl_throughput.jsonl (and to
# stdout); the first line names the versions, the backend and the driver.
#   OUT=bench_out bash bench/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
timeout "${BENCH_SECONDS:-540}" python bench/crl_throughput.py --preset gpu "$@" | tee "$OUT/crl_throughput.jsonl"
