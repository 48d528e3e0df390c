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

# 2026-11-25: SquareHead at 70% (two λ) and the 2:4 rows, with ARC-Easy on 500 questions; then the
# rest of issue 7's grid (every row above again with ARC-Easy, SquareHead for seft/spt) and the render.
S="python benchmarks/sweep.py --no-dense --teacher runs/teacher-dense-lora --arc-easy 500 --threads ${THREADS:-1} --no-render"
$S --methods masked_lora,spp --targets 0.7 --losses squarehead --squarehead-lambda 1,0.1
$S --methods masked_lora,spp,lora --targets 2:4 --losses ce
python benchmarks/sweep.py --teacher runs/teacher-dense-lora --arc-easy 500 --squarehead-lambda 1,0.1 --threads ${THREADS:-1}
