#!/usr/bin/env bash
# Do the toy's video `blink` questions ("how many times does the light blink ?", answers 1–3) carry the fall of
# its image `count` questions ("how many shapes are there ?", answers 1–4) under Video-SFT? Two runs of the
# trap's recipe (gradprobe sft's defaults) at m = 2 from the same starting toy, seed and schedule, side by side
# (one thread each): on all 2000 training clips, and on the 1500 that are not blink questions. Both are scored
# on the same held-out images and clips; count_channel.py compares them.
#
#   bash benchmarks/count_channel.sh OUT [SEED [gradprobe toy options, e.g. --cache-dir DIR]]   # in the project's environment
#
# The toy is the cached default (`gradprobe toy`, built when missing).
# OUT/all-2 and OUT/no-blink-2 hold the runs; OUT/count_channel.json and OUT/count_channel.md the comparison.
# An interrupted run resumes when the script is started again.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash benchmarks/count_channel.sh OUT [SEED [gradprobe toy options]]" >&2; exit 2; }
OUT=$1 SEED=${2:-0}
shift; [ $# -ge 1 ] && shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TOY=$(python -m cli.main toy "$@")  # prints the model's and the data's directories
MODEL=$(sed -n 's/^toy model: *//p' <<< "$TOY") D=$(sed -n 's/^data: *//p' <<< "$TOY")
python - "$D/train_videos.jsonl" "$OUT/no_blink.jsonl" <<'EOF'
import json, os, sys
src, dst = sys.argv[1:]
with open(src) as f, open(dst + ".tmp", "w") as g:
    g.writelines(line for line in f if json.loads(line)["qtype"] != "blink")
os.replace(dst + ".tmp", dst)
EOF
run() {  # name video-data
    local out=$OUT/$1 resume=()
    [ -f "$out/sft_summary.json" ] && { echo "$1: complete, kept" >&2; return; }
    if compgen -G "$out/checkpoint-*" > /dev/null; then resume=(--resume)
    else rm -rf "$out"; fi  # stopped before its first checkpoint: nothing to resume from
    echo "$(date +%T) $1" >&2
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m cli.main sft --frames 2 --seed "$SEED" --keep-clips \
        --model "$MODEL" --video-data "$2" --data-root "$D" --image-probe "$D/probe_images.jsonl" \
        --eval-image-data "$D/eval_images.jsonl" --eval-video-data "$D/eval_videos.jsonl" \
        --out "$out" "${resume[@]}" > "$out.log" 2>&1
}
run all-2 "$D/train_videos.jsonl" & a=$!
run no-blink-2 "$OUT/no_blink.jsonl" & b=$!
rc=0; wait $a || rc=$?; wait $b || rc=$?
[ "$rc" = 0 ] || { echo "a run failed (logs: $OUT/*.log)" >&2; exit "$rc"; }
python benchmarks/count_channel.py "$OUT" --out "$OUT/count_channel.json" > "$OUT/count_channel.md"
cat "$OUT/count_channel.md"
