#!/usr/bin/env bash
# One seed of the toy's temporal trap as benchmarks/RESULTS.md reports it: uniform runs at 2…64, the static and
# shuffled controls at 8 and 64, the three Hybrid-Frame arms, then the probes (align and decompose on the
# checkpoints) and the seed's tables. Runs go two at a time, one thread each (a run barely gains from a second
# thread, so two runs side by side use two cores best); an interrupted seed resumes when started again.
#
#   bash benchmarks/trap_seed.sh SEED OUT [extra gradprobe trap options …]   # in the project's environment
#
# OUT/trap-s<SEED> holds the runs, OUT/probes the probes, OUT/trap_seed<SEED>.json and
# OUT/trap_probes_seed<SEED>.json the combined results. Extra options go to every `gradprobe trap` call
# (e.g. --cache-dir DIR). The budget manifests of the hybrid arms come from the starting toy and are the same
# for every seed: copy a finished OUT/trap-s0/budget-<method>/ into OUT/trap-s<SEED>/ to reuse it.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash benchmarks/trap_seed.sh SEED OUT [gradprobe trap options]" >&2; exit 2; }
S=$1 OUT=$2
shift 2
cd "$(dirname "$0")/.."
GRID=2,4,8,16,32,64
RUN=$OUT/trap-s$S
mkdir -p "$RUN" "$OUT/logs"

trap_run() {  # frames samplers [more options]: one gradprobe trap call on one thread, logged
    local frames=$1 samplers=$2 log
    shift 2
    log="$OUT/logs/s$S-$frames-$samplers${2:+-$2}"
    echo "$(date +%T) seed $S: m=$frames $samplers $*" >&2
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m cli.main trap --frames "$frames" --samplers "$samplers" \
        --seed "$S" --out "$RUN" "$@" "${EXTRA[@]}" > "$log.out" 2> "$log.err"
}
EXTRA=("$@")
# the fixed budgets: two queues of about equal length (the m = 64 runs take longest)
both() {  # wait for the two queues; stop if either failed (its log says why)
    local rc=0
    wait "$1" || rc=$?
    wait "$2" || rc=$?
    [ "$rc" = 0 ] || { echo "seed $S: a run failed (logs in $OUT/logs)" >&2; exit "$rc"; }
}
( trap_run 64 uniform; trap_run 32 uniform; trap_run 16 uniform; trap_run 8 static; trap_run 4 uniform
  trap_run 2 uniform ) & a=$!
( trap_run 64 static; trap_run 64 shuffled; trap_run 8 shuffled; trap_run 8 uniform ) & b=$!
both "$a" "$b"
# the hybrid arms (each needs the whole grid, now trained and kept)
( trap_run "$GRID" uniform --hybrid gradient ) & a=$!
( trap_run "$GRID" uniform --hybrid redundancy; trap_run "$GRID" uniform --hybrid sufficiency ) & b=$!
both "$a" "$b"
# every run kept: the seed's summary and tables, then the probes on its checkpoints (both threads)
python -m cli.main trap --frames "$GRID" --samplers uniform,static,shuffled --control-frames 8,64 \
    --hybrid redundancy,sufficiency,gradient --seed "$S" --out "$RUN" "${EXTRA[@]}" > "$RUN/trap_tables.txt"
python benchmarks/trap_seeds.py "$RUN" --out "$OUT/trap_seed$S.json" --markdown > "$OUT/trap_seed$S.md"
python benchmarks/trap_probes.py "$RUN" --work "$OUT/probes" --out "$OUT/trap_probes_seed$S.json" --markdown \
    > "$OUT/trap_probes_seed$S.md"
echo "$(date +%T) seed $S: done ($RUN, $OUT/trap_seed$S.json, $OUT/trap_probes_seed$S.json)" >&2
