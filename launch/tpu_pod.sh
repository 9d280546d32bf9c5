#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice: one process per TPU VM worker,
# all started at once by `gcloud compute tpus tpu-vm ssh --worker=all`.
# JAX finds the other workers from the TPU metadata
# (--config.distributed.init=auto -> jax.distributed.initialize()), the mesh
# spans all chips of the slice, and each worker feeds its own rows of every
# batch.
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE -- --config=configs/cifar10_resnet20.py \
#       --workdir=/mnt/bucket/runs/r20_t2 --config.data_dir=/mnt/bucket/tensorflow_datasets
#
# Before the first run, put this repository at the same path on every worker
# and install it (once):
#   gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:csq_jax --zone=ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#       --command='cd csq_jax && pip install -e . "jax[tpu]"'
# The workdir (and data_dir) must be visible to every worker as a POSIX path, e.g. a gs://
# bucket mounted with gcsfuse at /mnt/bucket: orbax writes each checkpoint from all processes, and process 0 writes
# the metrics, summary and plots.
#
# Environment: PROJECT (gcloud project, default: gcloud's), REPO_DIR (path of
# the repository on the workers, default csq_jax in the home directory),
# PYTHON (default python3).
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- --config=... --workdir=/mnt/bucket/... [--config.KEY=VALUE ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 3
REPO_DIR=${REPO_DIR:-csq_jax}
PYTHON=${PYTHON:-python3}
ARGS=$(printf '%q ' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd $REPO_DIR && $PYTHON -m csq_jax.main $ARGS --config.distributed.init=auto"
