#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, the first node as the rendezvous endpoint.
#   sbatch configs/slurm_train.sh CONFIG.yaml data.corpus=/shared/shards output.dir=/shared/runs/a
# The corpus (or shard folder) and output.dir must be on a file system every node sees.
#SBATCH --job-name=medsam-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head:29500" \
  -m medsam train "$@"
