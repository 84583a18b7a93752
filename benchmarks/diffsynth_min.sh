#!/usr/bin/env bash
# Put the four modules of DiffSynth-Studio's `diffsynth` that diffsynth_reference.py uses into DEST, without
# the package's dependencies (torchvision, modelscope, ...). Then: PYTHONPATH=DEST python benchmarks/... or
# PYTHONPATH=DEST .venv/bin/pytest tests/test_diffsynth_reference.py
#
#   bash benchmarks/diffsynth_min.sh [DEST] [VERSION]      # default DEST .diffsynth-min, VERSION 2.1.12
#
# Copy DEST to a GPU machine without internet to time the reference there (it is plain Python files).
set -euo pipefail
dest=${1:-.diffsynth-min}
version=${2:-2.1.12}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: "diffsynth==$version" -d "$work"
"$python" - "$work"/diffsynth-*.whl "$dest" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, dest = sys.argv[1], Path(sys.argv[2])
modules = ["diffsynth/models/flux_dit.py", "diffsynth/models/qwen_image_dit.py", "diffsynth/models/general_modules.py",
           "diffsynth/utils/state_dict_converters/flux_dit.py"]
with zipfile.ZipFile(wheel) as archive:
    for name in modules:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(name))
for package in ["diffsynth", "diffsynth/models", "diffsynth/utils", "diffsynth/utils/state_dict_converters"]:
    (dest / package / "__init__.py").touch()
print(f"diffsynth modules in {dest}: PYTHONPATH={dest}")
EOF
