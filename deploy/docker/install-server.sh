#!/bin/sh
# The install step of Dockerfile.server, in one script so that tests/test_containers.py runs
# the very same steps without Docker:
#
#   install-server.sh SRC VENV     # SRC: a copy of the repository; VENV: created (/opt/venv)
#
# The server alone: no torch, no vLLM (README "Set-up"). lmcache is installed from SRC as a
# regular (not editable) package, so the image keeps no source tree; its C extension is built
# here (gcc and the Python headers are in the base image). PYTHON: the interpreter the venv is
# made from (python3).
set -eu
SRC=${1:?usage: install-server.sh SRC VENV}
VENV=${2:?usage: install-server.sh SRC VENV}
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$SRC"
"$VENV/bin/lmcache" --version
