#!/usr/bin/env bash
# Create .venv/ and install qwha's dependencies into it. Idempotent.
#
#   bash setup.sh            runtime + test + demo extras
#
# A torch that the chosen Python already has (e.g. your CUDA build) is kept: the venv then sees it
# through --system-site-packages and pip finds "torch>=2.1" satisfied. Only when no torch is importable
# do we install one, pinned (TORCH_SPEC, default torch==2.13.0) so that pip does not pick an
# arbitrary multi-GB build. Override the interpreter with PYTHON=/path/to/python.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found, installing $TORCH_SPEC" >&2
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
"$VPY" -m pip install -q -e ".[test,demo]"
"$VPY" -c "import torch, numpy, safetensors, tokenizers; print('setup: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
