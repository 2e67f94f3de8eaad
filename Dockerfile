# ctld image for GPU training (k8s/ PyTorchJobs), shard building, TensorBoard and inference.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t registry.example.com/ctld:0.1.0 .
#
# CUDA *devel* base: DeepSpeed compiles its ops with nvcc. The ones training uses are built here; any other
# op is JIT-compiled on first use into TORCH_EXTENSIONS_DIR (writable, under HOME). torch is the CUDA build
# of the exact version the project tests (constraints.txt), installed in the same pip command as ctld so no
# dependency can pull a different torch.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

# The PyTorch wheel index for the base image's CUDA version (12.8 -> cu128); change both together.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
# GPU architectures DeepSpeed's prebuilt ops are compiled for: A100 8.0, L40S/L4 8.9, H100/H200 9.0.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG GIT_COMMIT=unknown

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python 3.11 (the tested version), a compiler toolchain for DeepSpeed ops (the base has nvcc), libaio for
# DeepSpeed's NVMe offload, tar for `kubectl cp`, getent (libc-bin) for the DNS wait in launch/multinode.sh.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv \
        build-essential ninja-build libaio-dev git ca-certificates tar \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "${VIRTUAL_ENV}" \
    && pip install --no-cache-dir --upgrade pip==24.3.1 setuptools==75.8.0 wheel==0.45.1

WORKDIR /opt/ctld
COPY . /opt/ctld

# One pip command for torch (CUDA build) and ctld with all its dependencies, every version from
# constraints.txt: its `torch==2.13.0` matches 2.13.0+cu128 from the PyTorch index, and PIP_CONSTRAINT also
# reaches the isolated build of DeepSpeed's source package.
RUN PIP_CONSTRAINT=/opt/ctld/constraints.txt \
    pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" -e "/opt/ctld[dev]" \
    && python -c "import torch; assert torch.version.cuda, 'a CPU-only torch was installed'"

# Rebuild DeepSpeed from the same pinned source with the ops training needs compiled in (no GPU is needed
# to compile): FusedAdam for the AdamW of launch/zero2.json and zero3.json, CPUAdam for optimizer offload.
# --no-deps --no-build-isolation: build against the torch installed above and change nothing else.
RUN DS_VERSION="$(python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" \
    && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    pip install --no-cache-dir --no-deps --no-build-isolation --force-reinstall "deepspeed==${DS_VERSION}" \
    && ds_report

# A numeric non-root user (runAsUser 1000 in k8s/). HOME and the caches are writable by that user and by
# group 0, so clusters that run images under an arbitrary UID (OpenShift) work too.
RUN groupadd --gid 1000 ctld \
    && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/ctld ctld \
    && mkdir -p /home/ctld/.cache/torch_extensions /home/ctld/.cache/triton /home/ctld/.cache/huggingface \
    && chown -R 1000:0 /home/ctld \
    && chmod -R g=u /home/ctld

ENV HOME=/home/ctld \
    XDG_CACHE_HOME=/home/ctld/.cache \
    TORCH_EXTENSIONS_DIR=/home/ctld/.cache/torch_extensions \
    TRITON_CACHE_DIR=/home/ctld/.cache/triton \
    HF_HOME=/home/ctld/.cache/huggingface \
    MPLCONFIGDIR=/home/ctld/.cache/matplotlib \
    CTLD_GIT_COMMIT=${GIT_COMMIT}

USER 1000:1000

# No ENTRYPOINT: k8s/ manifests give the full command (launch/multinode.sh ... for training).
CMD ["bash"]
