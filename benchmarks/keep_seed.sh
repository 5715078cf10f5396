#!/usr/bin/env bash
# Copy what benchmarks/RESULTS.md reports of one seed run by benchmarks/trap_seed.sh into DEST (e.g.
# benchmarks/results/toy_v5), without checkpoints:
#
#   bash benchmarks/keep_seed.sh SEED OUT DEST
#
# DEST/trap/seed-SEED: trap_summary.json, trap_tables.txt, the budget manifests and, per run, sft_summary.json,
# gradprobe_eval.jsonl and gradprobe_trajectory.jsonl; DEST/probes/seed-SEED: the decompositions (summary and
# tables) and align's checkpoints.* with each checkpoint's summary.json; DEST/trap_seedSEED.json and
# DEST/trap_probes_seedSEED.json. trap_seeds.py reads the first as it is, trap_probes.py --read the first two.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: bash benchmarks/keep_seed.sh SEED OUT DEST" >&2; exit 2; }
S=$1 OUT=$2 DEST=$3
RUN=$OUT/trap-s$S PROBES=$OUT/probes/trap-s$S
for f in "$RUN/trap_summary.json" "$RUN/trap_tables.txt" "$PROBES/align/checkpoints.json" \
         "$OUT/trap_seed$S.json" "$OUT/trap_probes_seed$S.json"; do
    [ -f "$f" ] || { echo "keep_seed.sh: $f not found: has seed $S finished?" >&2; exit 2; }
done
T=$DEST/trap/seed-$S P=$DEST/probes/seed-$S
mkdir -p "$T" "$P/align"
cp "$RUN/trap_summary.json" "$RUN/trap_tables.txt" "$T/"
for d in "$RUN"/budget-*/; do
    mkdir -p "$T/$(basename "$d")"
    cp "$d"/budget_settings.json "$d"/budget_summary.json "$d"/manifest.jsonl "$T/$(basename "$d")/"
done
for d in "$RUN"/*frames-*/; do
    mkdir -p "$T/$(basename "$d")"
    cp "$d"/sft_summary.json "$d"/gradprobe_eval.jsonl "$d"/gradprobe_trajectory.jsonl "$T/$(basename "$d")/"
done
cp "$PROBES"/align/checkpoints.* "$P/align/"
for d in "$PROBES"/align/*/; do
    mkdir -p "$P/align/$(basename "$d")"
    cp "$d/summary.json" "$P/align/$(basename "$d")/"
done
for d in "$PROBES"/decompose-*/; do
    mkdir -p "$P/$(basename "$d")"
    cp "$d"/summary.json "$d"/decompose*.csv "$P/$(basename "$d")/"
done
cp "$OUT/trap_seed$S.json" "$DEST/trap_seed$S.json"
cp "$OUT/trap_probes_seed$S.json" "$DEST/trap_probes_seed$S.json"
echo "seed $S kept in $T, $P and $DEST/trap_seed$S.json, $DEST/trap_probes_seed$S.json" >&2
