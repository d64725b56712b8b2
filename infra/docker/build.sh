#!/usr/bin/env bash
# Build the still images from the repo root, tagged with the git short sha and :latest-style
# aliases:  still:cpu-<sha>, still:cpu-latest, still:latest (= cpu, the default image of
# infra/compose.yaml), still:cuda-<sha>, still:cuda-latest.
#
#   bash infra/docker/build.sh              # both images
#   bash infra/docker/build.sh cpu          # one of them: cpu | cuda
#   IMAGE=registry.example.com/team/still PUSH=1 bash infra/docker/build.sh cuda
#
# The context is the repo root (the image holds the git checkout at /app); the Dockerfiles are
# passed with --file and the ignore list is infra/docker/dockerignore, which BuildKit reads
# through the Dockerfile.<variant>.dockerignore symlinks. A dirty worktree still builds, but the
# tag gets a -dirty suffix so a sha tag always means exactly that commit.
# Extra `docker build` arguments go after `--`:  bash infra/docker/build.sh cuda -- --no-cache
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
image="${IMAGE:-still}"

variants=()
while (($#)); do
  case "$1" in
    cpu|cuda) variants+=("$1"); shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (expected cpu, cuda or -- docker args)" >&2; exit 2 ;;
  esac
done
((${#variants[@]})) || variants=(cpu cuda)

sha="$(git -C "$root" rev-parse --short HEAD)"
if [[ -n "$(git -C "$root" --no-optional-locks status --porcelain --untracked-files=no)" ]]; then
  echo "build.sh: worktree has uncommitted changes; tagging ${sha}-dirty" >&2
  sha="${sha}-dirty"
fi

export DOCKER_BUILDKIT=1  # the per-Dockerfile .dockerignore is a BuildKit feature
for variant in "${variants[@]}"; do
  dockerfile="$here/Dockerfile.$variant"
  [[ -f "$dockerfile" && -f "$dockerfile.dockerignore" ]] || {
    echo "build.sh: $dockerfile or its .dockerignore is missing" >&2; exit 1; }
  tags=("${image}:${variant}-${sha}" "${image}:${variant}-latest")
  [[ "$variant" == cpu ]] && tags+=("${image}:latest")
  echo "build.sh: ${tags[*]} (context $root)"
  docker build \
    --file "$dockerfile" \
    --build-arg "GIT_SHA=$sha" \
    "${tags[@]/#/--tag=}" \
    "$@" \
    "$root"
  if [[ "${PUSH:-0}" == 1 ]]; then
    for tag in "${tags[@]}"; do docker push "$tag"; done
  fi
done
