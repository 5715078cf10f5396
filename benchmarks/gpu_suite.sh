#!/usr/bin/env bash
# One command for a GPU machine: the measurement core on the Qwen2.5-VL-7B shape (random weights, bf16, built
# from a config: nothing is downloaded), each figure written as JSON into OUT.
#
#   bash benchmarks/gpu_suite.sh OUT                 # one H100/H200
#   bash benchmarks/gpu_suite.sh OUT --shape tiny    # the same scripts at a tiny shape on the CPU (CI runs this)
#
# What it measures (each step is one script with its own JSON, written as it goes; a step that fails or runs out
# of time is recorded in OUT/suite.json and the next one runs):
#   build.json            building the random-weight checkpoint (save_pretrained) and the data
#   sketch.json           the sketch's own work over every parameter's gradient (Triton on CUDA) against reading
#                         every gradient once
#   families_sketch.json  plain forward+backward against a probed one at 8/16/32/64 frames, every parameter,
#                         a 2^22-bucket sketch, peak memory per budget
#   families_ckpt.json    the same with activation checkpointing of every block (--checkpointing on) in both passes:
#                         whether 64 frames of the 7B shape fit one GPU, and what the recomputation costs
#   families_exact.json   the same over the last 4 decoder layers with --sketch auto (exact rows where they take at
#                         most a quarter of the free memory), and the decompose code path at the largest budget
#   trainstep.json        the alignment callback's share of a Trainer Video-SFT step (AdamW, 8 frames)
#   hvp.json              each Hessian-vector-product backend against a plain gradient (last 8 decoder layers)
# The whole suite keeps to a deadline (DEADLINE seconds, 480 on the GPU): each step gets its own limit or what is
# left, whichever is smaller. Videos are written as PNG frame folders when PyAV is missing. The checkpoint and
# data are cached in WORK (default /tmp/gradprobe-bench; the 7B checkpoint takes about 16 GB of disk).
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
    7b) DEVICE=cuda; SIDE=448; FRAMES=8,16,32,64; REPEATS=3; DEADLINE=${DEADLINE:-480}
        INCLUDE='language_model.layers.(2[0-7])\.'; EXACT='language_model.layers.(2[4-7])\.'; STEPS=12; EVERY=4 ;;
    tiny) DEVICE=cpu; SIDE=64; FRAMES=8,16; REPEATS=2; DEADLINE=${DEADLINE:-900}
        INCLUDE='language_model.layers.1\.'; EXACT=$INCLUDE; STEPS=6; EVERY=3 ;;
    *) echo "gpu_suite.sh: --shape must be 7b or tiny, got $SHAPE" >&2; exit 2 ;;
esac
WORK=${GRADPROBE_BENCH_WORK:-/tmp/gradprobe-bench}
PY=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)
steps=()

run() {  # name, its own limit in seconds, then the command; limited to the smaller of that and what is left
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    local left=$(( start + DEADLINE - t0 ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 0 ]; then
        steps+=("{\"step\": \"$name\", \"rc\": 124, \"seconds\": 0}")
        echo "$name: no time left" >&2
        return
    fi
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit\": $limit}")
    echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" >&2
}

common=(--shape "$SHAPE" --device "$DEVICE" --side "$SIDE" --work "$WORK")
run build 150 "$PY" benchmarks/bench_families.py --family qwen2_5_vl "${common[@]}" --build-only --out "$OUT/build.json"
run sketch 60 "$PY" benchmarks/bench_sketch.py --shape "$SHAPE" --device "$DEVICE" --k 4194304 --repeats "$REPEATS" \
    --out "$OUT/sketch.json"
run families_sketch 150 "$PY" benchmarks/bench_families.py --family qwen2_5_vl "${common[@]}" --frames "$FRAMES" \
    --repeats "$REPEATS" --sketch 4194304 --out "$OUT/families_sketch.json"
run families_ckpt 150 "$PY" benchmarks/bench_families.py --family qwen2_5_vl "${common[@]}" --frames "$FRAMES" \
    --repeats "$REPEATS" --sketch 4194304 --checkpointing on --out "$OUT/families_ckpt.json"
run families_exact 150 "$PY" benchmarks/bench_families.py --family qwen2_5_vl "${common[@]}" --frames "$FRAMES" \
    --repeats "$REPEATS" --sketch auto --include "$EXACT" --decompose --out "$OUT/families_exact.json"
run trainstep 120 "$PY" benchmarks/bench_trainstep.py --family qwen2_5_vl "${common[@]}" --frames 8 --steps "$STEPS" \
    --every "$EVERY" --sketch 4194304 --out "$OUT/trainstep.json"
run hvp 240 "$PY" benchmarks/bench_hvp.py "${common[@]}" --repeats "$REPEATS" --no-beta --include "$INCLUDE" \
    --out "$OUT/hvp.json"

{
    echo "{\"shape\": \"$SHAPE\", \"device\": \"$DEVICE\", \"seconds\": $(( $(date +%s) - start )), \"steps\": ["
    (IFS=,; echo "${steps[*]}")
    echo "]}"
} > "$OUT/suite.json"
echo "wrote $OUT/suite.json" >&2
failed=$(grep -c '"rc": [1-9]' "$OUT/suite.json" || true)
[ "$failed" -eq 0 ]
