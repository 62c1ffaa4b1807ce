#!/usr/bin/env bash
# Creates the virtual environment and installs the project with its test extras.
#
# torch and torchvision must be a pair built together: torchvision's C++ ops link against
# one torch build, and beside another `import torchvision` (hence `import timm`) fails
# with "operator torchvision::nms does not exist". Three kinds of machine:
#  1. pip offers a coherent pair from files on disk (some machines keep torch 2.14.1 /
#     torchvision 0.29.1 and their CUDA libraries in a local index, with pip capped at
#     them in /etc/xdg/pip): that pair is installed, about a minute, nothing downloaded.
#  2. only a CPU torch wheel in pip's find-links (/opt/wheels or $PIP_FIND_LINKS): PyPI has
#     no CPU torchvision for it (its torchvision wheels are linked against its CUDA torch)
#     and PyPI's coherent pair is a CUDA build of several GB, minutes more per CI run. The
#     smallest safe path: the local CPU torch plus PyPI's matching torchvision, whose ops
#     cannot load; cts/_compat.py then skips only their registration (cts uses none of them).
#  3. neither: the registry's pair.
# The installed versions are pinned as constraints so no dependency (timm) changes them.
set -euo pipefail
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

# True when pip would install torch and torchvision themselves from local files (a few of
# their small dependencies may still come from the registry).
local_pair() {
  local report
  report=$(mktemp)
  "$py" -m pip install -q --dry-run --ignore-installed --report "$report" torch torchvision \
    >/dev/null 2>&1 || { rm -f "$report"; return 1; }
  "$py" - "$report" <<'EOF'
import json, sys
urls = {i["metadata"]["name"]: i["download_info"]["url"] for i in json.load(open(sys.argv[1]))["install"]}
pair = [urls.get(name, "") for name in ("torch", "torchvision")]
sys.exit(0 if all(url.startswith("file:") for url in pair) else 1)
EOF
  local status=$?
  rm -f "$report"
  return $status
}

if ! "$py" -c "import torch" 2>/dev/null; then
  tag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  wheel=""
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    [ -d "$dir" ] || continue
    found=$(ls -1 "$dir"/torch-*-"$tag"-*linux*x86_64.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$found" ] && wheel="$found" && break
  done
  if local_pair; then
    echo "installing torch and torchvision from local files"
    "$py" -m pip install -q torch torchvision
  elif [ -n "$wheel" ]; then
    echo "installing torch from local wheel $wheel (torchvision from the registry)"
    "$py" -m pip install -q "$wheel"
  else
    "$py" -m pip install -q "torch>=2.4" torchvision
  fi
fi

versions=$("$py" -c "
import importlib.metadata as m
for name in ('torch', 'torchvision'):
    try:
        print(f'{name}=={m.version(name).split(\"+\")[0]}')
    except m.PackageNotFoundError:
        pass
")
echo "$versions" > "$venv/constraints.txt"
# The ~150 other packages (dvc, mlflow and their trees): uv fetches and unpacks them in
# parallel, about 10 s against pip's 75 s here. pip is the fallback wherever uv fails;
# both hold torch and torchvision at the installed pair through the constraints.
# --compile-bytecode: pip writes .pyc files at install, uv does not; without them every `cts`
# process compiles its ~2000 modules again wherever Python may not write them (read-only
# site-packages, PYTHONDONTWRITEBYTECODE): 4-5 s of the 12 s a tiny stage took here.
if ! { "$py" -m pip install -q uv >/dev/null 2>&1 &&
  "$venv/bin/uv" pip install -q --compile-bytecode --python "$py" -c "$venv/constraints.txt" -e ".[test]"; }; then
  echo "uv could not install the dependencies: installing them with pip"
  "$py" -m pip install -q -c "$venv/constraints.txt" -e ".[test]"
fi
torch_version=$("$py" -c "import torch; print(torch.__version__)")
echo "installed into $venv (torch $torch_version)"
