#!/usr/bin/env bash
# Create (or bring up to date) the Python environment used to regenerate the
# golden MoE fixtures: a virtualenv at <repo>/.venv-golden holding the pinned
# torch (CPU use only) and transformers listed in requirements.txt.
#
# Idempotent: when the venv already holds exactly these pins (stamp file
# matches requirements.txt) it only re-checks the imports and exits.
#
# Usage: scripts/golden/setup.sh        (from anywhere)
# Env:   PYTHON=python3.11  to choose the interpreter (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/.venv-golden"
req="$here/requirements.txt"
stamp="$venv/.golden-requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[golden] creating virtualenv $venv"
    "$python" -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "[golden] $venv already matches requirements.txt"
else
    echo "[golden] installing pinned packages (torch + NVIDIA runtime libs, transformers)"
    # --no-deps: torch's METADATA would otherwise pull cuda-toolkit[all-ish],
    # triton, cuda-bindings, ... Every package actually needed is pinned in
    # requirements.txt, so nothing is left to resolve.
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input \
        --no-deps --only-binary=:all: -r "$req"
    rm -f "$stamp"
fi

# Check that everything generate.py needs imports on a CPU-only machine.
"$venv/bin/python" - <<'PY'
import torch, transformers, safetensors, numpy
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
print(f"[golden] ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"safetensors {safetensors.__version__}, numpy {numpy.__version__}")
PY

echo "$want" > "$stamp"
