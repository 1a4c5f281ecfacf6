"""parrot_lc: serve LangChain applications as graphs of Semantic Variables (after Parrot, OSDI'24)."""

import os
import sys

from setuptools import find_packages, setup

XGRAMMAR = "xgrammar>=0.2.9,<0.3"  # scripts/install.sh installs the same, without its dependencies


def extensions() -> dict:
    """The compiled kernels, each built where it can be, or left out with a warning (the engine then runs its
    torch or Triton code, which computes the same values):
    - parrot_lc._cpu, a CPU engine's per-token work (csrc/cpu_decode.cpp), wherever torch and a C++ compiler are
      found at build time;
    - parrot_lc._cuda, the CUDA decode-attention kernels, where torch has CUDA and nvcc is found, for the GPUs torch
      sees (or those TORCH_CUDA_ARCH_LIST names; the kernels need sm_80 or newer).
    pip's isolated build environment has no torch: scripts/install.sh installs without build isolation."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A build that, if an extension fails (no compiler, an nvcc whose version torch refuses, a compile error),
        says why and goes on with the others."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any failure leaves the torch / Triton code to serve
                print(f"warning: {ext.name} not built ({error}); the engine runs without it", file=sys.stderr)

    # -fopenmp: the kernels split work through at::parallel_for, inline OpenMP in torch's builds; the library then
    # shares torch's OpenMP runtime (the same soname, already loaded), not a second pool of threads.
    modules = [CppExtension(name="parrot_lc._cpu", sources=["csrc/cpu_decode.cpp"],
                            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
    if torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        # On Hopper the kernels' wgmma path needs the arch-specific sm_90a target, which torch's default (sm_90)
        # leaves out; given a target, torch adds none of its own.
        hopper = "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available() and all(
            torch.cuda.get_device_capability(i) == (9, 0) for i in range(torch.cuda.device_count()))
        modules.append(CUDAExtension(
            name="parrot_lc._cuda",
            sources=["csrc/bindings.cpp", "csrc/shared_prefix_decode.cu"],
            depends=["csrc/shared_prefix_decode.h"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]
                                + (["-gencode=arch=compute_90a,code=sm_90a"] if hopper else [])},
        ))
    return {"ext_modules": modules, "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    name="parrot-lc",
    version="0.1.0",
    description="A LangChain-compatible serving backend for LLM applications, after Parrot (OSDI'24)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["parrot_lc", "parrot_lc.*"]),
    package_data={"parrot_lc.engine": ["tiny/*"]},
    install_requires=[
        # torch 2.13 (CPU) here, 2.11 (CUDA) on the GPU machine; install torch==2.13.0 first on a CPU box.
        "torch>=2.11,<2.14",
        "transformers>=5.17,<6",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "gguf>=0.17",
        "numpy>=1.26",
        "pydantic>=2.7,<3",
        "pydantic-settings>=2.3,<3",
        "pyyaml>=6",  # YAML config files (TOML and JSON need nothing beyond the standard library)
        "tqdm>=4.60",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "prometheus-client>=0.20",
        "langchain-core>=1.0,<2",
        # Constrained decoding (engine/constraints.py) needs xgrammar (chosen over llguidance by measurement:
        # benchmarks/RESULTS.md), which declares Triton for its GPU kernel alone: 1 GB that a CPU install never
        # loads. scripts/install.sh installs it without (--no-deps); the `constraints` extra is the plain way.
    ],
    extras_require={
        # Triton: the GPU's attention kernels; the tests run them in its CPU interpreter, too.
        "cuda": ["triton>=3.6", XGRAMMAR],
        "constraints": [XGRAMMAR],
        # accelerate: transformers reads GGUF files only with it installed (the tests compare against that);
        # matplotlib and aiohttp: the benchmarks (their smoke runs are tests)
        "test": ["triton>=3.6; platform_system == 'Linux'", XGRAMMAR, "pytest>=8", "matplotlib>=3.8", "aiohttp>=3.9",
                 "hypothesis>=6.100", "accelerate>=1.0", "openai>=1.40", "langchain-tests>=1.1.9,<2", "pytest-asyncio>=0.23", "langchain-text-splitters>=1.0",
                 "schemathesis>=4.0,<5", "jsonschema>=4.20",
                 # deferred runs of langchain-classic chains and LangGraph graphs (both on langchain-core 1.x)
                 "langchain-classic>=1.0,<2", "langgraph>=1.0,<2"],
        "examples": ["langchain-text-splitters>=1.0", "langgraph>=1.0,<2"],
    },
    entry_points={"console_scripts": ["parrot-lc=parrot_lc.cli:main"]},
    **extensions(),
)
