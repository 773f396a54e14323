#!/usr/bin/env bash
# TPU VM pod slice: copy this checkout to every worker, set it up once, run the same command on all.
#
#   launch/tpu_pod.sh TPU_NAME ZONE setup
#   launch/tpu_pod.sh TPU_NAME ZONE run -m stepvideo_jax.generate --config configs/generate/<name>.py
#
# `setup` ships `git archive HEAD` to ~/stepvideo-jax on every worker and installs
# requirements.txt plus jax[tpu] of the pinned version into ~/stepvideo-jax/.venv. `run` re-ships the
# code (fast; the venv stays) and starts the command on all workers at once with
# STEPVIDEO_DISTRIBUTED=1, so launch/entry.py calls jax.distributed.initialize() (coordinator and
# worker ids come from the TPU metadata server). Each worker's output goes to
# ~/stepvideo-jax/logs/worker-<n>.log and worker 0's also to this terminal. Data and checkpoints must
# be on storage every worker can read (e.g. a gs:// bucket or a mounted disk).
# Optional: PROJECT=<gcp project> to pass --project.
set -euo pipefail

if [[ $# -lt 3 ]] || [[ "$3" != setup && "$3" != run ]]; then
  echo "usage: $0 TPU_NAME ZONE setup | $0 TPU_NAME ZONE run -m <module> [args...]" >&2
  exit 2
fi
TPU="$1"; ZONE="$2"; ACTION="$3"; shift 3
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone "$ZONE" ${PROJECT:+--project "$PROJECT"})
REPO="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
JAX_VERSION="$(sed -n 's/^jax==//p' "$REPO/requirements.txt")"

ship() {
  local tarball
  tarball="$(mktemp -d)/stepvideo-jax.tar.gz"
  git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  "${GCLOUD[@]}" scp "$tarball" "$TPU:/tmp/stepvideo-jax.tar.gz" --worker=all "${FLAGS[@]}"
  "${GCLOUD[@]}" ssh "$TPU" --worker=all "${FLAGS[@]}" \
    --command "mkdir -p ~/stepvideo-jax && tar -xzf /tmp/stepvideo-jax.tar.gz -C ~/stepvideo-jax"
}

ship
if [[ "$ACTION" == setup ]]; then
  "${GCLOUD[@]}" ssh "$TPU" --worker=all "${FLAGS[@]}" --command "cd ~/stepvideo-jax && \
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
  exit 0
fi

ARGS="$(printf '%q ' "$@")"
"${GCLOUD[@]}" ssh "$TPU" --worker=all "${FLAGS[@]}" --command "set -o pipefail; cd ~/stepvideo-jax && mkdir -p logs && \
  W=\$(curl -s -H 'Metadata-Flavor: Google' \
       http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); \
  STEPVIDEO_DISTRIBUTED=1 .venv/bin/python launch/entry.py $ARGS 2>&1 | tee logs/worker-\$W.log | \
  { if [[ \$W == 0 ]]; then cat; else cat > /dev/null; fi; }"
