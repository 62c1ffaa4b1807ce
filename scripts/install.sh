#!/usr/bin/env bash
# Creates the virtual environment and installs the project with its test extras.
# torch comes from a local wheel when the machine has one (pip's find-links), because
# an unpinned `torch` from the registry pulls several GB of CUDA packages; the installed
# version is then pinned as a constraint so no dependency (torchvision via timm) upgrades it.
set -euo pipefail
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
  tag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  wheel=""
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    [ -d "$dir" ] || continue
    found=$(ls -1 "$dir"/torch-*-"$tag"-*linux*x86_64.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] && wheel="$found" && break
  done
  if [ -n "$wheel" ]; then
    echo "installing torch from local wheel $wheel"
    "$py" -m pip install -q "$wheel"
  else
    "$py" -m pip install -q "torch>=2.4"
  fi
fi

torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$torch_version" > "$venv/constraints.txt"
"$py" -m pip install -q -c "$venv/constraints.txt" -e ".[test]"
echo "installed into $venv (torch $torch_version)"
