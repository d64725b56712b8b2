#!/usr/bin/env bash
# Build the still images from a clean clone of HEAD, tagged with its git short sha:
#   still:cpu-<sha>, still:cpu-latest, still:latest (= cpu, the default image of compose.yaml),
#   still:cuda-<sha>, still:cuda-latest (CUDA 13), or still:cuda12-<sha>, ... with CUDA_MAJOR=12.
#
#   bash infra/docker/build.sh              # both images
#   bash infra/docker/build.sh cpu          # one of them: cpu | cuda
#   CUDA_MAJOR=12 bash infra/docker/build.sh cuda      # CUDA 12 base, torch and TensorRT
#   IMAGE=registry.example.com/team/still PUSH=1 bash infra/docker/build.sh cuda
#
# The context is a fresh `git clone` of the checkout at HEAD, so the image holds exactly the
# commit its tag names: untracked files (a stray .env, notebooks, data) and uncommitted edits are
# never copied, and a dirty worktree only gets a warning. The clone keeps .git (DVC needs it in
# /app); its `origin` is this checkout's origin, minus any credentials in the URL, so runs that
# push results (flows' git_push) push to the real remote. The ignore list is
# infra/docker/dockerignore, read by BuildKit through the Dockerfile.<variant>.dockerignore
# symlinks. Extra `docker build` arguments go after `--`:
#   bash infra/docker/build.sh cuda -- --no-cache
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
image="${IMAGE:-still}"
cuda_major="${CUDA_MAJOR:-13}"

variants=()
while (($#)); do
  case "$1" in
    cpu|cuda) variants+=("$1"); shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (expected cpu, cuda or -- docker args)" >&2; exit 2 ;;
  esac
done
((${#variants[@]})) || variants=(cpu cuda)

# The CUDA base image per major; install.sh picks the matching torch index and TensorRT wheel
# and refuses a base of another major.
case "$cuda_major" in
  13) cuda_image=nvidia/cuda:13.0.1-base-ubuntu22.04; cuda_tag=cuda ;;
  12) cuda_image=nvidia/cuda:12.8.1-base-ubuntu22.04; cuda_tag=cuda12 ;;
  *) echo "build.sh: CUDA_MAJOR=$cuda_major is not supported (12 or 13)" >&2; exit 2 ;;
esac

commit="$(git -C "$root" rev-parse HEAD)"
sha="$(git -C "$root" rev-parse --short HEAD)"
if [[ -n "$(git -C "$root" --no-optional-locks status --porcelain)" ]]; then
  echo "build.sh: the worktree has uncommitted or untracked files; they are NOT in the image," \
    "which is built from commit $sha" >&2
fi

context="$(mktemp -d "${TMPDIR:-/tmp}/still-build.XXXXXX")"
trap 'rm -rf "$context"' EXIT
git clone --quiet --no-checkout "$root" "$context/src"
git -C "$context/src" -c advice.detachedHead=false checkout --quiet --detach "$commit"
origin="$(git -C "$root" remote get-url origin 2>/dev/null || true)"
if [[ -n "$origin" ]]; then
  # https://user:token@host/repo.git -> https://host/repo.git: a token must not ship in a layer.
  origin="$(printf '%s' "$origin" | sed -E 's#^(https?://)[^/@]*@#\1#')"
  git -C "$context/src" remote set-url origin "$origin"
else
  git -C "$context/src" remote remove origin
fi

export DOCKER_BUILDKIT=1  # the per-Dockerfile .dockerignore is a BuildKit feature
for variant in "${variants[@]}"; do
  dockerfile="$context/src/infra/docker/Dockerfile.$variant"
  [[ -f "$dockerfile" && -e "$dockerfile.dockerignore" ]] || {
    echo "build.sh: infra/docker/Dockerfile.$variant or its .dockerignore is not committed" >&2
    exit 1; }
  args=(--build-arg "GIT_SHA=$sha")
  tag="$variant"
  if [[ "$variant" == cuda ]]; then
    args+=(--build-arg "CUDA_MAJOR=$cuda_major" --build-arg "CUDA_IMAGE=$cuda_image")
    tag="$cuda_tag"
  fi
  tags=("${image}:${tag}-${sha}" "${image}:${tag}-latest")
  [[ "$variant" == cpu ]] && tags+=("${image}:latest")
  echo "build.sh: ${tags[*]} (commit $sha)"
  docker build \
    --file "$dockerfile" \
    "${args[@]}" \
    "${tags[@]/#/--tag=}" \
    "$@" \
    "$context/src"
  if [[ "${PUSH:-0}" == 1 ]]; then
    for t in "${tags[@]}"; do docker push "$t"; done
  fi
done
