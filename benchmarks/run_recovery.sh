#!/usr/bin/env bash
# The recovery rows of docs/benchmarks.md, in order of importance (run inside the project venv).
# benchmarks/sweep.py runs the wider grid (2:4, SquareHead) and skips rows already recorded.

cd "$(dirname "$0")/.."
export TQDM_MININTERVAL=30
R="python benchmarks/recovery.py --pruner wanda --steps 200 --seq-len 128 --batch-size 4 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
$R --method masked_lora --sparsity 0.5 --lr 1e-3
$R --method spp --sparsity 0.5 --lr 4e-3
$R --method lora --sparsity 0.5 --lr 1e-3
$R --method masked_lora --sparsity 0.7 --lr 1e-3
$R --method spp --sparsity 0.7 --lr 4e-3
$R --method lora --sparsity 0.7 --lr 1e-3
$R --method seft --sparsity 0.7 --lr 1e-3
$R --method seft --sparsity 0.5 --lr 1e-3
$R --method spt --sparsity 0.7 --lr 1e-2 --spt-prompt-length 8 --spt-prune-steps 10
$R --method spt --sparsity 0.5 --lr 1e-2 --spt-prompt-length 8 --spt-prune-steps 10
# the dense fine-tuned reference, saved as the SquareHead teacher for sweep.py --teacher runs/teacher-dense-lora
$R --method lora --sparsity 0 --lr 1e-3 --save-merged runs/teacher-dense-lora
