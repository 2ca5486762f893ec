#!/bin/bash
# The GPU checks of issue 7 as one script, for a lent GPU machine (its python3 has torch with CUDA and
# transformers), most important first, each part under its own time limit so that a slow part leaves the others
# their time; every output under $OUT:
#   env.txt       the machine
#   tests.txt     tests/test_cuda.py
#   profile.txt   where the first token's time goes, ours by stage and transformers (medium preset)
#   int8_step.txt bench_int8_step.py: compiled int8 steps at 1-8 rows, the sum over int8 weight rows against a
#                 16-bit copy (what sets quantize.CUDA_SUMMED_ROWS); INT8_STEP_ARGS=--coordinate-descent adds both
#                 compiled with coordinate descent tuning
#   bench.txt     bench_generate.py on $PRESET (default the real-scale mistral-7b): ours eager and compiled with
#                 CUDA graphs, transformers with sdpa; the rest of the $TOTAL_S seconds
#
#     OUT=/tmp/out bash benchmarks/gpu_run.sh
#     DEVICE=cpu PRESET=small MODES=bfloat16 bash benchmarks/gpu_run.sh     # the script itself, on a CPU
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LLAVA_NEXT_TEST_CACHE=/tmp/llava-next-tests
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nproc; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== tests ($SECONDS s)"
timeout "${TESTS_S:-150}" python3 -m pytest -p no:cacheprovider -q --durations=5 tests/test_cuda.py > "$OUT/tests.txt" 2>&1
echo "exit $?" >> "$OUT/tests.txt"
tail -25 "$OUT/tests.txt"
echo "== profile ($SECONDS s)"
timeout "${PROFILE_S:-90}" python3 benchmarks/profile_first_token.py --device "$DEVICE" --preset "${PROFILE_PRESET:-medium}" \
    --dtype bfloat16 --top 15 > "$OUT/profile.txt" 2>&1
echo "exit $?" >> "$OUT/profile.txt"
grep -v "^USDT" "$OUT/profile.txt" | grep -E "first token|stage|kernel launches|Synchron|Memcpy|exit"
echo "== int8 step ($SECONDS s)"
timeout "${INT8_STEP_S:-120}" python3 benchmarks/bench_int8_step.py --device "$DEVICE" \
    --preset "${INT8_STEP_PRESET:-mistral-7b}" --layers "${INT8_STEP_LAYERS:-4}" ${INT8_STEP_ARGS:-} \
    > "$OUT/int8_step.txt" 2>&1
echo "exit $?" >> "$OUT/int8_step.txt"
grep -v "^{" "$OUT/int8_step.txt" | tail -10
echo "== bench ($SECONDS s)"
left=$(( ${TOTAL_S:-560} - SECONDS ))
[ "$left" -gt 30 ] || { echo "no time left for the benchmark"; exit 1; }
timeout "$left" python3 benchmarks/bench_generate.py --device "$DEVICE" --preset "${PRESET:-mistral-7b}" \
    --modes "${MODES:-bfloat16+compile,int8+compile,int4+compile,bfloat16}" --reference bfloat16 \
    --rounds "${ROUNDS:-1}" --new-tokens "${NEW_TOKENS:-64}" > "$OUT/bench.txt" 2>&1
echo "exit $?" >> "$OUT/bench.txt"
grep -v "^{" "$OUT/bench.txt" | tail -30
echo "== done ($SECONDS s)"
