"""parrot_lc: serve LangChain applications as graphs of Semantic Variables (after Parrot, OSDI'24)."""

import os
import sys

from setuptools import find_packages, setup

XGRAMMAR = "xgrammar>=0.2.9,<0.3"  # scripts/install.sh installs the same, without its dependencies


def cuda_extension() -> dict:
    """The CUDA decode-attention kernels as parrot_lc._cuda, built only where torch has CUDA and nvcc is found,
    for the GPUs torch sees (or those TORCH_CUDA_ARCH_LIST names; the kernels need sm_80 or newer). Elsewhere (a
    CPU torch, pip's isolated build environment, which has no torch, a CUDA image without nvcc), or if the build
    fails, the package installs without it and the engine decodes with its Triton kernel."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return {}

    class OptionalBuildExtension(BuildExtension):
        """A build that, if it fails (an nvcc whose version torch refuses, a compile error), says why and goes on."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any failure leaves the Triton kernel to serve
                print(f"warning: parrot_lc._cuda not built ({error}); decode attention runs in Triton",
                      file=sys.stderr)

    extension = CUDAExtension(
        name="parrot_lc._cuda",
        sources=["csrc/bindings.cpp", "csrc/shared_prefix_decode.cu"],
        depends=["csrc/shared_prefix_decode.h"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


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
    **cuda_extension(),
)
