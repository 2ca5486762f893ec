#!/bin/bash
# The GPU checks of issue 7 as one script, for a lent GPU machine (its python3 has torch with CUDA and
# transformers): the machine, the CUDA tests, then the medium benchmark (ours eager and compiled with CUDA graphs,
# transformers with sdpa), every output under $OUT.
#
#     OUT=/tmp/out bash benchmarks/gpu_run.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAVA_NEXT_TEST_CACHE=/tmp/llava-next-tests
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TESTS_S:-180}" python3 -m pytest -x -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
timeout "${BENCH_S:-420}" python3 benchmarks/bench_generate.py --device cuda --preset "${PRESET:-medium}" \
    --modes "${MODES:-bfloat16,int8,int4,bfloat16+compile,int8+compile,int4+compile}" --reference bfloat16 \
    --rounds "${ROUNDS:-3}" --new-tokens "${NEW_TOKENS:-64}" 2>&1 | tee "$OUT/bench.txt"
