# parrot_lc as a container: `parrot-lc serve` (manager + local engines) by default, `parrot-lc engine` with
# `--entrypoint` (see compose.yaml). Build a GPU image (default) or a CPU one:
#   docker build -t parrot-lc:cuda .
#   docker build --build-arg TARGET=cpu -t parrot-lc:cpu .
# The install steps are scripts/install.sh, the ones CI runs. For a slim CPU image, point pip at an index of CPU
# torch wheels: --build-arg PIP_EXTRA_INDEX_URL=<index> (PyPI's torch is the CUDA build).
ARG TARGET=cuda

# CUDA: torch's wheels bring the CUDA libraries; the image brings Python and the C compiler Triton builds its
# launchers with. The host needs the NVIDIA driver and container toolkit (`--gpus all`).
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*

# CPU: the C++ compiler builds the CPU engine's compiled kernels (parrot_lc._cpu); without it they are left out.
FROM python:3.11-slim AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

FROM base-${TARGET}
ARG TARGET
ARG PIP_EXTRA_INDEX_URL
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
WORKDIR /app
COPY setup.py README.md ./
COPY scripts ./scripts
COPY parrot_lc ./parrot_lc
# The CUDA decode kernel builds where the image has nvcc (a -devel base); this -base image has none, and the
# engine decodes with its Triton kernel.
COPY csrc ./csrc
RUN bash scripts/install.sh "${TARGET}"

# Loopback is the default bind: inside a container the server must listen on every interface to be reached.
ENV PARROT_HOST=0.0.0.0 PARROT_ENGINE_HOST=0.0.0.0
EXPOSE 9000 9100
# /health answers 503 while the server drains for a shutdown, so the container turns unhealthy then too.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/health', timeout=4)"]
# Exec form: parrot-lc is PID 1 and gets `docker stop`'s SIGTERM, on which it drains and exits 0.
ENTRYPOINT ["parrot-lc", "serve"]
