#!/bin/sh
# Install still into an image, in two steps the Dockerfiles call (so the dependency layer stays
# cached until the lock changes):
#   install.sh deps cpu|cuda      requirements-runtime.lock (no dev tools), torch from the index of
#                                 the variant; cuda: the TensorRT wheel of the same CUDA major
#   install.sh project cpu|cuda   in /app, the checkout: the project itself, then
#                                 check_image.py (lock pins, no dev packages, one CUDA major)
# cuda reads CUDA_MAJOR (12 or 13), TENSORRT_VERSION and, from the nvidia/cuda base image,
# CUDA_VERSION; TORCH_INDEX overrides the torch index. DRY_RUN=1 prints the commands only.
#
# Why the TensorRT wheel is named here instead of `pip install .[trt]`: the `tensorrt`
# meta-package 10.16.1.11 depends on tensorrt_cu13, so on a CUDA 12 image it would install CUDA
# 13 TensorRT libraries next to a CUDA 12 torch. tensorrt-cu12 / tensorrt-cu13 are the same
# release built per CUDA major.
set -eu

usage() { echo "usage: install.sh deps|project cpu|cuda" >&2; exit 2; }
[ $# -eq 2 ] || usage
step="$1"
variant="$2"
run() {
  echo "+ $*"
  [ "${DRY_RUN:-0}" = 1 ] || "$@"
}

case "$variant" in
  cpu)
    # The CPU build of the locked torch (2.13.0+cpu); PyPI's wheel pulls ~3 GB of CUDA libraries.
    torch_index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    ;;
  cuda)
    major="${CUDA_MAJOR:?install.sh: set CUDA_MAJOR (12 or 13)}"
    case "$major" in
      12) default_index=https://download.pytorch.org/whl/cu128 ;;
      13) default_index=https://download.pytorch.org/whl/cu130 ;;
      *) echo "install.sh: CUDA_MAJOR=$major is not supported (12 or 13)" >&2; exit 2 ;;
    esac
    # nvidia/cuda images set CUDA_VERSION; a base of another major would mix CUDA versions.
    base="${CUDA_VERSION:-}"
    if [ "${base%%.*}" != "$major" ]; then
      echo "install.sh: the base image is CUDA ${base:-(no CUDA_VERSION)}, but CUDA_MAJOR=$major;" \
        "pass a CUDA_IMAGE of that major (infra/docker/build.sh does)" >&2
      exit 2
    fi
    : "${TENSORRT_VERSION:?install.sh: set TENSORRT_VERSION}"
    torch_index="${TORCH_INDEX:-$default_index}"
    ;;
  *) usage ;;
esac

case "$step" in
  deps)
    run pip install --extra-index-url "$torch_index" -r requirements-runtime.lock
    if [ "$variant" = cuda ]; then
      run pip install "tensorrt-cu${major}==${TENSORRT_VERSION}"
    fi
    ;;
  project)
    # --no-deps: everything the project needs is in the runtime lock (s3 extra included).
    run pip install --no-deps -e .
    run pip check
    run python infra/docker/check_image.py "$variant"
    ;;
  *) usage ;;
esac
