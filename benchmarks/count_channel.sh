#!/usr/bin/env bash
# Does one video question type carry the fall of an image question type under Video-SFT? By default: do the
# toy's `blink` questions ("how many times does the light blink ?", answers 1–3) carry the fall of its image
# `count` questions ("how many shapes are there ?", answers 1–4)? Two runs of the trap's recipe (gradprobe sft's
# defaults) at m = 2 from the same starting toy, seed and schedule, side by side (one thread each): on all 2000
# training clips, and on the 1500 that are not blink questions. Both are scored on the same held-out images and
# clips; count_channel.py compares them. DROP (a video question type) and FRAMES (the budget) choose another
# pair, e.g. DROP=order FRAMES=16.
#
#   [DROP=blink FRAMES=2] bash benchmarks/count_channel.sh OUT [SEED [gradprobe toy options, e.g. --cache-dir DIR]]
#
# The toy is the cached default (`gradprobe toy`, built when missing).
# OUT/all-<FRAMES> and OUT/no-<DROP>-<FRAMES> hold the runs; OUT/count_channel.json and OUT/count_channel.md the
# comparison. An interrupted run resumes when the script is started again.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash benchmarks/count_channel.sh OUT [SEED [gradprobe toy options]]" >&2; exit 2; }
OUT=$1 SEED=${2:-0} DROP=${DROP:-blink} M=${FRAMES:-2}
shift; [ $# -ge 1 ] && shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TOY=$(python -m cli.main toy "$@")  # prints the model's and the data's directories
MODEL=$(sed -n 's/^toy model: *//p' <<< "$TOY") D=$(sed -n 's/^data: *//p' <<< "$TOY")
python - "$D/train_videos.jsonl" "$OUT/no_$DROP.jsonl" "$DROP" <<'EOF'
import json, os, sys
src, dst, drop = sys.argv[1:]
with open(src) as f:
    lines = list(f)
kept = [line for line in lines if json.loads(line)["qtype"] != drop]
if len(kept) == len(lines):
    sys.exit(f"count_channel.sh: DROP={drop}: no training clip has that question type")
with open(dst + ".tmp", "w") as g:
    g.writelines(kept)
os.replace(dst + ".tmp", dst)
EOF
run() {  # name video-data
    local out=$OUT/$1 resume=()
    [ -f "$out/sft_summary.json" ] && { echo "$1: complete, kept" >&2; return; }
    if compgen -G "$out/checkpoint-*" > /dev/null; then resume=(--resume)
    else rm -rf "$out"; fi  # stopped before its first checkpoint: nothing to resume from
    echo "$(date +%T) $1" >&2
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m cli.main sft --frames "$M" --seed "$SEED" --keep-clips \
        --model "$MODEL" --video-data "$2" --data-root "$D" --image-probe "$D/probe_images.jsonl" \
        --eval-image-data "$D/eval_images.jsonl" --eval-video-data "$D/eval_videos.jsonl" \
        --out "$out" "${resume[@]}" > "$out.log" 2>&1
}
run "all-$M" "$D/train_videos.jsonl" & a=$!
run "no-$DROP-$M" "$OUT/no_$DROP.jsonl" & b=$!
rc=0; wait $a || rc=$?; wait $b || rc=$?
[ "$rc" = 0 ] || { echo "a run failed (logs: $OUT/*.log)" >&2; exit "$rc"; }
python benchmarks/count_channel.py "$OUT" --out "$OUT/count_channel.json" > "$OUT/count_channel.md"
cat "$OUT/count_channel.md"
