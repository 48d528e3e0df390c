#!/usr/bin/env bash
# The recovery rows of docs/benchmarks.md, in order of importance (run inside the project venv).

cd "$(dirname "$0")/.."
export TQDM_MININTERVAL=30
R="python benchmarks/recovery.py --pruner wanda --steps 200 --seq-len 128 --batch-size 4 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
$R --method masked_lora --sparsity 0.5 --lr 1e-3
$R --method spp --sparsity 0.5 --lr 4e-3
$R --method lora --sparsity 0.5 --lr 1e-3
$R --method masked_lora --sparsity 0.7 --lr 1e-3
$R --method spp --sparsity 0.7 --lr 4e-3
$R --method lora --sparsity 0.7 --lr 1e-3
$R --method lora --sparsity 0 --lr 1e-3
