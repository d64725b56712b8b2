#!/bin/sh
# Entrypoint of the still images (run by tini, which forwards SIGTERM and reaps children), for
# every command: a compose worker, a Kubernetes Job's `prefect flow-run execute`, `docker run`.
#  - DVC_REMOTE_ENDPOINT: the S3 endpoint as seen from this container, written to the
#    checkout's .dvc/config.local for DVC_REMOTE (default: the repo's default remote). The
#    committed .dvc/config names the endpoint a developer machine sees (localhost:9000).
#  - GIT_TOKEN (GIT_USERNAME, default x-access-token): an HTTPS token for pushing run results
#    (flows' git_push). Only a credential helper that reads the variable is stored; the token
#    itself never touches the disk.
# Then it execs the command, so the command gets the signals.
set -eu

if [ -n "${DVC_REMOTE_ENDPOINT:-}" ]; then
  remote="${DVC_REMOTE:-}"
  [ -n "$remote" ] || remote="$(dvc config core.remote 2>/dev/null || true)"
  if [ -z "$remote" ]; then
    echo "still-entrypoint: DVC_REMOTE_ENDPOINT is set but $(pwd) has no default DVC remote;" \
      "set DVC_REMOTE" >&2
    exit 2
  fi
  dvc remote modify --local "$remote" endpointurl "$DVC_REMOTE_ENDPOINT"
fi

if [ -n "${GIT_TOKEN:-}" ]; then
  # shellcheck disable=SC2016  # expanded by git's shell when the helper runs, not here
  git config --global credential.helper \
    '!f() { test "$1" = get && printf "username=%s\npassword=%s\n" "${GIT_USERNAME:-x-access-token}" "$GIT_TOKEN"; }; f'
fi

exec "$@"
