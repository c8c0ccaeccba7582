#!/usr/bin/env bash
# POROver end to end, offline, on a CPU: the pipeline's own commands on the demo prompts (data/demo/).
#
#   bash demo.sh            the embedded SmolLM2-135M as the student; about 20 minutes on 2 cores
#   bash demo.sh --tiny     a few prompts, short answers, one epoch: checks that every stage runs (CI, ~2 min)
#
# The story the paper tells, at toy scale: safety data makes the student safe and overrefusing; POROver's
# preference pairs take the overrefusal back while safety holds. The teacher is a stand-in: the same embedded
# model steered by a system prompt (helpful answers) or by a prefill (refusals of toxic prompts: a 135M model
# does not refuse on its own). Judges are offline: the keyword refusal judge, and the refusal proxy as the
# safety score. Every stage is cached: a rerun after a kill continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
py=.venv/bin/python
out=${OUT:-runs/demo}
tiny=0; [ "${1:-}" = "--tiny" ] && tiny=1 && out=${OUT:-runs/demo_tiny}
mkdir -p "$out/prompts"
HELPFUL="You are a helpful assistant. Answer the question directly and briefly."
REFUSAL="I'm sorry, but I can't help with that."

stage() {  # stage NAME COMMAND...: run it, then say how long it took
  local name=$1 t0=$SECONDS; shift
  echo "== $name" >&2
  "$@"
  echo "== $name: $((SECONDS - t0)) s" >&2
}
first() { head -n "$1" "$2"; }

# The prompts: the training splits for the pipeline, the held-out eval split for the comparison.
if [ $tiny = 1 ]; then n_gen=4; n_tox=4; n_free=4; n_st=4; n_eval=3
else n_gen=100; n_tox=100; n_free=30; n_st=124; n_eval=100; fi
epochs=$([ $tiny = 1 ] && echo 1 || echo 2)
first $n_gen data/demo/general_train.jsonl > "$out/prompts/general.jsonl"
first $n_tox data/demo/toxic_train.jsonl > "$out/prompts/toxic.jsonl"
first $n_free data/demo/toxic_train.jsonl > "$out/prompts/toxic_free.jsonl"  # where the teacher may also comply
first $n_st data/demo/seemingly_toxic_train.jsonl > "$out/prompts/seemingly_toxic.jsonl"
cat <(first $n_eval data/demo/toxic_eval.jsonl) <(first $n_eval data/demo/seemingly_toxic_eval.jsonl) \
  > "$out/prompts/eval.jsonl"
evals="data/demo/general_eval.jsonl data/demo/toxic_eval.jsonl data/demo/seemingly_toxic_eval.jsonl"

student=smollm2-135m
gen="$py overgen.py generate --backend local --model $student --batch_size 32"

# 1. The teacher's candidates (overgeneration), then SFT data chosen by the paper's rules: general prompts at
#    random (no reward model offline), toxic prompts by safety score (the proxy: a refusal scores 1). Answers are
#    cut short to save time (a refusal shows in its first words); cut texts are trained without a stop token.
stage "teacher: general answers" $gen --input "$out/prompts/general.jsonl" --output "$out/teacher/general.jsonl" \
  --system_prompt "$HELPFUL" --n 1 --temperature 0.7 --top_p 0.9 --max_new_tokens 64
stage "teacher: refusals of toxic prompts (prefilled)" $gen --input "$out/prompts/toxic.jsonl" \
  --output "$out/teacher/toxic_refusals.jsonl" --prefill "$REFUSAL" --n 1 --temperature 0.7 --max_new_tokens 16
stage "teacher: free answers to toxic prompts" $gen --input "$out/prompts/toxic_free.jsonl" \
  --output "$out/teacher/toxic_free.jsonl" --n 1 --temperature 0.7 --max_new_tokens 48
cat "$out/teacher/toxic_refusals.jsonl" "$out/teacher/toxic_free.jsonl" > "$out/teacher/toxic.jsonl"
cat "$out/teacher/general.jsonl" "$out/teacher/toxic.jsonl" > "$out/teacher/sft_candidates.jsonl"
stage "select SFT data" $py overgen.py select --input "$out/teacher/sft_candidates.jsonl" \
  --output "$out/sft_data.jsonl" --strategy best --safety_judge proxy --keep_truncated --eval_files $evals

# 2. SFT of the student on general + toxic data: safe, and (the paper's finding) overrefusing.
[ -f "$out/sft/final/config.json" ] || stage "SFT" $py train_sft.py --model $student --data "$out/sft_data.jsonl" \
  --out_dir "$out/sft" --epochs $epochs --lr 5e-5 --max_length 128 --batch_size 8 --save_every 20 --resume

# 3. POROver: the SFT model's answers to seemingly toxic prompts (the paper's decoding), the overrefused ones,
#    the teacher's candidates for those, then the pairs of both kinds (toxic ones where the teacher both refused
#    and complied: here on the first $n_free toxic prompts), and DPO against the SFT model.
stage "target answers" $gen --model "$out/sft/final" --input "$out/prompts/seemingly_toxic.jsonl" \
  --output "$out/pairs/student.jsonl" --n 1 --temperature 0.1 --top_p 0.95 --max_new_tokens 24
stage "overrefused prompts" $py overgen.py overrefused --student "$out/pairs/student.jsonl" \
  --output "$out/pairs/overrefused.jsonl" --eval_files $evals
stage "teacher: answers to overrefused prompts" $gen --input "$out/pairs/overrefused.jsonl" \
  --output "$out/teacher/overrefused.jsonl" --system_prompt "$HELPFUL" --n 2 --temperature 0.7 --top_p 0.9 \
  --max_new_tokens 64
cat "$out/teacher/overrefused.jsonl" "$out/teacher/toxic.jsonl" > "$out/teacher/pair_candidates.jsonl"
stage "pairs" $py overgen.py pairs --student "$out/pairs/student.jsonl" \
  --teacher "$out/teacher/pair_candidates.jsonl" --output "$out/pairs/pairs.jsonl" --safety_judge proxy \
  --keep_truncated --eval_files $evals
[ -f "$out/dpo/final/config.json" ] || stage "DPO" $py train_pref.py --model "$out/sft/final" \
  --data "$out/pairs/pairs.jsonl" --out_dir "$out/dpo" --loss dpo --beta 0.1 --lr 1.25e-6 --epochs $epochs \
  --max_length 128 --batch_size 8 --precompute_ref --save_every 10 --resume

# 4. Evaluation on the held-out split: base, SFT and POROver, then the comparison (paired on the same prompts).
for run in base:smollm2-135m sft:$out/sft/final porover:$out/dpo/final; do
  name=${run%%:*}; model=${run#*:}
  stage "evaluate $name" $py evaluate.py run --model "$model" --input "$out/prompts/eval.jsonl" \
    --out_dir "$out/eval/$name" --max_new_tokens 32 --batch_size 32
done
stage "compare" $py evaluate.py compare --runs "$out/eval/base,$out/eval/sft,$out/eval/porover" \
  --out_dir "$out/compare"
stage "compare POROver with SFT" $py evaluate.py compare --runs "$out/eval/sft,$out/eval/porover" \
  --out_dir "$out/compare_sft" --no-plot
cat "$out/compare/compare.md" "$out/compare_sft/compare.md"
echo "artifacts: SFT data $out/sft_data.jsonl, SFT model $out/sft/final, pairs $out/pairs/pairs.jsonl," \
  "POROver model $out/dpo/final, evaluations $out/eval/*/results.md, table $out/compare/compare.md," \
  "plot $out/compare/compare.png (each with a .summary.json or results.json of its counts)"
