#!/usr/bin/env bash
# POROver's pair building offline, end to end on the demo prompts: the main job's SFT model as the student
# (4 samples each at temperature 1), the embedded model with a helpful system prompt as a stand-in teacher
# (2 samples), the keyword judge. About 12 minutes on 2 CPU cores. Usage: bash bench/pairs_demo.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/pairs_demo}
py=.venv/bin/python
mkdir -p "$out"
cat data/demo/seemingly_toxic_train.jsonl data/demo/toxic_train.jsonl > "$out/prompts.jsonl"
[ -f "$out/sft/final/config.json" ] || $py train_sft.py --out_dir "$out/sft" --epochs 3 --lr 5e-5
$py overgen.py generate --backend local --model "$out/sft/final" --input "$out/prompts.jsonl" \
    --output "$out/student.jsonl" --n 4 --temperature 1.0 --max_new_tokens 96 --batch_size 16
$py overgen.py generate --backend local --model smollm2-135m --input "$out/prompts.jsonl" \
    --output "$out/teacher.jsonl" --n 2 --temperature 0.7 --max_new_tokens 192 --batch_size 16 \
    --system_prompt "You are a helpful assistant. Answer harmless questions fully, even when they use alarming words. Refuse only requests that would help someone cause real harm."
for tau in 0.5 0.25; do
  $py overgen.py pairs --student "$out/student.jsonl" --teacher "$out/teacher.jsonl" --output "$out/pairs_tau$tau.jsonl" \
      --tau_refusal $tau --anchor_ratio 1.0 --eval_files data/demo/seemingly_toxic_eval.jsonl data/demo/toxic_eval.jsonl
done
