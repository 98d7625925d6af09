#!/usr/bin/env bash
# Runs the same command on every host of a Cloud TPU pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE python -m launch.study --config=configs/study.py:sd \
#       --config.model.path=PATH/sd-v1-5 --workdir=gs-fuse-or-nfs/study
#
# Every host runs the command with --coordinator=auto (JAX finds process 0 and the process
# count from the TPU metadata); the devices of all hosts form one 'seeds' mesh and process 0
# writes the outputs. The repository (and its virtual environment, and the model files) must
# already be at the same path on every host, e.g. via a startup script or a shared disk.
# Optional: REPO_DIR (default: this repository's path) and PROJECT (gcloud's default project).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND..." >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2
repo_dir=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
project_flag=()
if [[ -n "${PROJECT:-}" ]]; then
  project_flag=(--project="${PROJECT}")
fi

# Quote every argument so it reaches the remote shell unchanged.
printf -v remote_cmd '%q ' "$@"
exec gcloud compute tpu-vm ssh "${tpu_name}" --zone="${zone}" "${project_flag[@]}" \
  --worker=all --command="cd $(printf '%q' "${repo_dir}") && ${remote_cmd} --coordinator=auto"
