#!/usr/bin/env bash
# Train the bundled demo model from nothing with the package's own commands: synthetic data, a tokenizer trained
# on it, stage 1 (captions) from random weights, stage 2 (questions) and stage 2 again with a lower, restarted
# schedule, then a held-out evaluation.
# `make demo-model` runs this from the repository root; it takes about 52 minutes on 2 CPU cores.
set -euo pipefail
L=${LLAVA_NEXT:-.venv/bin/llava-next}
WORK=runs/demo
OUT=llava_next/demo/model
START=$(date +%s)
rm -rf "$WORK/stage1" "$WORK/stage2" "$WORK/stage3" "$WORK/data" "$WORK/eval"
mkdir -p "$WORK"

$L data synth --out "$WORK/data" --n 40000 --seed 1 --turns 6
$L data tokenizer --data "$WORK/data/captions.json" "$WORK/data/qa.json" --out "$WORK/tokenizer" --vocab-size 400 \
  --template vicuna
$L train --config recipes/demo/stage1.yaml
$L train --config recipes/demo/stage2.yaml
$L train --config recipes/demo/stage3.yaml

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$WORK"/stage3/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$OUT"/
cp "$WORK"/stage3/{preprocessor_config.json,processor_config.json,chat_template.json} "$OUT"/
for stage in stage1 stage2 stage3; do
  cp "$WORK/$stage/recipe.yaml" "$OUT/$stage-recipe.yaml"
  cp "$WORK/$stage/train_log.jsonl" "$OUT/$stage-train_log.jsonl"
done
TRAINED=$(date +%s)

# held out: images and questions from a seed training never saw
$L data synth --out "$WORK/eval" --n 500 --seed 1234 --turns 1
$L eval --model "$OUT" --data "$WORK/eval/qa.json" > "$OUT/eval.md"
cat "$OUT/eval.md"
echo "trained in $(( (TRAINED - START) / 60 )) min $(( (TRAINED - START) % 60 )) s" | tee "$OUT/training_time.txt"
