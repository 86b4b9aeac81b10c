#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image, with the autograder
# zip unpacked in /autograder/source (python gradescope/build.py makes the zip). It
# installs the course package (its checks, the manifest of the shipped exercises and
# the grader) into a virtual environment, with the versions pinned in requirements.txt
# and the CPU build of torch.
#
# AUTOGRADER_DIR (default /autograder) and PYTHON (default python3) are for testing.
set -euo pipefail
AUTOGRADER_DIR="${AUTOGRADER_DIR:-/autograder}"
PYTHON="${PYTHON:-python3}"
COURSE="$AUTOGRADER_DIR/source/course"
VENV="$AUTOGRADER_DIR/venv"

if ! "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
"$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }
# torch from PyTorch's CPU index (the default Linux wheel carries CUDA: gigabytes)
torch_pin="$(grep -E '^torch==' "$COURSE/requirements.txt")"
pip install --index-url https://download.pytorch.org/whl/cpu "$torch_pin"
pip install --constraint "$COURSE/requirements.txt" "$COURSE"
