#!/usr/bin/env bash
# One command for a GPU machine: the measurement core on the Qwen2.5-VL-7B shape (random weights, bf16, built
# from a config: nothing is downloaded), each figure written as JSON into OUT.
#
#   bash benchmarks/gpu_suite.sh OUT                 # one H100/H200
#   bash benchmarks/gpu_suite.sh OUT --shape tiny    # the same scripts at a tiny shape on the CPU (CI runs this)
#
# What it measures (each step is one script with its own JSON; a step that fails or runs out of time is
# recorded in OUT/suite.json and the next one runs):
#   families_exact.json   plain forward+backward against a probed one at 8/16/32/64 frames, exact reference
#                         rows where they fit (--sketch auto), peak memory per budget; and the decompose code
#                         path at the largest budget (time, peak memory)
#   families_sketch.json  the same with a 2^22-bucket sketch
#   hvp.json              each Hessian-vector-product backend against a plain gradient (last 8 decoder layers
#                         on the 7B shape)
# Videos are written as PNG frame folders when PyAV is missing. The checkpoint and data are cached in
# WORK (default /tmp/gradprobe-bench; the 7B checkpoint takes about 16 GB of disk).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_suite.sh OUT [--shape 7b|tiny]}
shift
SHAPE=7b
while [ $# -gt 0 ]; do
    case "$1" in
        --shape) SHAPE=$2; shift 2 ;;
        *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$SHAPE" in
    7b) DEVICE=cuda; SIDE=448; FRAMES=8,16,32,64; REPEATS=3; LIMIT=150; INCLUDE='language_model.layers.(2[0-7])\.' ;;
    tiny) DEVICE=cpu; SIDE=64; FRAMES=8,16; REPEATS=2; LIMIT=300; INCLUDE='language_model.layers.1\.' ;;
    *) echo "gpu_suite.sh: --shape must be 7b or tiny, got $SHAPE" >&2; exit 2 ;;
esac
WORK=${GRADPROBE_BENCH_WORK:-/tmp/gradprobe-bench}
PY=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)
steps=()

run() {  # name, then the command; each step is limited to LIMIT seconds
    local name=$1; shift
    local t0=$(date +%s)
    timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}")
    echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" >&2
}

run families_exact "$PY" benchmarks/bench_families.py --family qwen2_5_vl --shape "$SHAPE" --device "$DEVICE" \
    --side "$SIDE" --frames "$FRAMES" --repeats "$REPEATS" --sketch auto --decompose --work "$WORK" \
    --out "$OUT/families_exact.json"
run families_sketch "$PY" benchmarks/bench_families.py --family qwen2_5_vl --shape "$SHAPE" --device "$DEVICE" \
    --side "$SIDE" --frames "$FRAMES" --repeats "$REPEATS" --sketch 4194304 --work "$WORK" \
    --out "$OUT/families_sketch.json"
run hvp "$PY" benchmarks/bench_hvp.py --shape "$SHAPE" --device "$DEVICE" --side "$SIDE" --repeats "$REPEATS" \
    --no-beta --include "$INCLUDE" --work "$WORK" --out "$OUT/hvp.json"

{
    echo "{\"shape\": \"$SHAPE\", \"device\": \"$DEVICE\", \"seconds\": $(( $(date +%s) - start )), \"steps\": ["
    (IFS=,; echo "${steps[*]}")
    echo "]}"
} > "$OUT/suite.json"
echo "wrote $OUT/suite.json" >&2
failed=$(grep -c '"rc": [1-9]' "$OUT/suite.json" || true)
[ "$failed" -eq 0 ]
