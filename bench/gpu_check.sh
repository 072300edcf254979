#!/usr/bin/env bash
# The scale benchmarks on one GPU within 8 minutes, then one table and one JSON line (bench/gpu_summary.py):
#   1. the WHT kernel: bf16/fp16/fp32, n in {4096, 14336, 3072, 11008, 13824}, 16384 rows, forward and inverse,
#      GB/s and % of a device copy (bench/bench_wht.py --kernel-only)
#   2. the training step at the config's widths: one block, seq 512, batch 1 and 16, packed 2-bit base, bf16
#      autocast, QWHA against LoRA (CLoQ), SHiRA, 2-D DHT and 2-D DCT at r = 64 (bench/bench_step.py --config)
#   3. the QWHA init of one block's 7 linears at the config's widths, r = 64, 2 bits, per stage
#      (bench/bench_init_gpu.py --detail)
#
#   bash bench/gpu_check.sh [--out DIR] [--config PATH]     # DIR: runs/gpu_check; PATH: bench/configs/llama-3.1-8b.json
#   bash bench/gpu_check.sh --tiny                          # the same commands on a CPU at tiny sizes (PATH:
#                                                           # bench/configs/tiny.json)
#   bash bench/gpu_check.sh [--tiny] --dry-run              # print the commands (one a line), run nothing
#
# Each benchmark runs under its own time limit within the 8 minutes (GPU_CHECK_BUDGET seconds, default 470);
# its stdout and stderr go to DIR/<name>.log and DIR/<name>.err. The Python is $PYTHON, else python3.
# Exit status: 0 when every benchmark gave a result, 1 when some did not, 2 without a CUDA device (not --tiny).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=runs/gpu_check
CONFIG=
TINY=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check: unknown argument $1 (expected --out DIR, --config PATH, --tiny, --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "$CONFIG" ]; then
  if [ "$TINY" = 1 ]; then CONFIG=bench/configs/tiny.json; else CONFIG=bench/configs/llama-3.1-8b.json; fi
fi
if [ ! -f "$CONFIG" ]; then
  echo "gpu_check: --config $CONFIG: no such config.json" >&2; exit 2
fi
HAS_CUDA="import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
if [ "$TINY" = 0 ] && [ "$DRY" = 0 ] && ! "$PY" -c "$HAS_CUDA" 2>/dev/null; then
  echo "gpu_check: no CUDA device ($PY: torch.cuda.is_available() is False or torch is missing); nothing measured" \
       "(bash bench/gpu_check.sh --tiny is the CPU run at tiny sizes)" >&2
  exit 2
fi
[ "$DRY" = 0 ] && mkdir -p "$OUT"
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-470}

# run NAME LIMIT CMD...: CMD under min(LIMIT, what is left of the budget) seconds, output to $OUT/NAME.{log,err}
run() {
  local name=$1 cap=$2 left
  shift 2
  if [ "$DRY" = 1 ]; then
    printf '%q ' "$@"; printf '> %q\n' "$OUT/$name.log"; return
  fi
  left=$((BUDGET - (SECONDS - START)))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 5 ]; then
    echo "gpu_check: $name skipped (no time left)" >&2; return
  fi
  echo "gpu_check: $name (at most ${cap}s, $((SECONDS - START))s elapsed)" >&2
  timeout -k 10 "$cap" "$@" >"$OUT/$name.log" 2>"$OUT/$name.err"
  local rc=$?
  [ $rc -ne 0 ] && echo "gpu_check: $name exited with status $rc (124: out of time); see $OUT/$name.err" >&2
}

if [ "$TINY" = 1 ]; then
  DEV=cpu
  WHT=(--kernel-table --kernel-rows 64 --kernel-widths 192 448 --kernel-dtypes bfloat16,float32 --burst 1 --repeats 1)
  STEP=(--layers 1 --batch 1 --seq-len 16 --reps 1 --rank 4 --base packed --threads 1)
  INIT=(--rank 4 --threads 1)
else
  DEV=cuda
  WHT=(--kernel-rows 16384 --repeats 5 --burst 20)
  STEP=(--layers 1 --batch 1,16 --seq-len 512 --reps 7 --rank 64 --base packed --autocast on)
  INIT=(--rank 64 --bits 2 --blocks 1)
fi
run wht 150 "$PY" bench/bench_wht.py --device "$DEV" --kernel-only "${WHT[@]}"
run step 180 "$PY" bench/bench_step.py --config "$CONFIG" --device "$DEV" --quiet "${STEP[@]}"
run init 170 "$PY" bench/bench_init_gpu.py --config "$CONFIG" --device "$DEV" --detail --quiet "${INIT[@]}"
SUMMARY=("$PY" bench/gpu_summary.py --wht "$OUT/wht.log" --step "$OUT/step.log" --init "$OUT/init.log")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${SUMMARY[@]}"; echo; exit 0
fi
echo "gpu_check: done in $((SECONDS - START))s; logs in $OUT" >&2
"${SUMMARY[@]}"
