#!/usr/bin/env bash
# The recovery rows of docs/results/recovery.md, in order of importance (run inside the project venv).
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
# rest of the recovery grid (every row above again with ARC-Easy, SquareHead for seft/spt) and the render.
S="python benchmarks/sweep.py --no-dense --teacher runs/teacher-dense-lora --arc-easy 500 --threads ${THREADS:-1} --no-render"
$S --methods masked_lora,spp --targets 0.7 --losses squarehead --squarehead-lambda 1,0.1
$S --methods masked_lora,spp,lora --targets 2:4 --losses ce
python benchmarks/sweep.py --teacher runs/teacher-dense-lora --arc-easy 500 --squarehead-lambda 1,0.1 --threads ${THREADS:-1}

# 2026-11-30: SquareHead λ=0.1 + logit KL λ=1 for every method at Wanda 70%, and on the best 50% recipe;
# the 50% probes (lr 4e-3, rank 32) of SparseGPT with induction + masked LoRA.
$S --methods masked_lora,seft,spp,spt --targets 0.7 --losses squarehead --squarehead-lambda 0.1 --extra-args="--logit-lambda 1"
$S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses squarehead --squarehead-targets 0.5 \
   --squarehead-lambda 0.1 --lr masked_lora=2e-3 --extra-args="--induce --logit-lambda 1"
$S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses ce --lr masked_lora=4e-3 --extra-args=--induce
$S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses ce --lr masked_lora=2e-3 --extra-args="--induce --r 32"
$S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses squarehead --squarehead-targets 0.5 \
   --squarehead-lambda 0.1 --lr masked_lora=2e-3 --extra-args="--induce --r 32 --logit-lambda 1"

# 2026-11-30 (second run): the 50% CE rows again with ARC-Easy; SEFT and SPT at 2:4 (they keep N:M
# now); plain SquareHead λ=0.1 for seft/spt at 70%; rank 64 / 128 and logit λ=2 on the 50% recipe.
$S --methods masked_lora,spp,seft,spt,lora --targets 0.5 --losses ce
$S --methods seft,spt --targets 2:4 --losses ce
$S --methods seft,spt --targets 0.7 --losses squarehead --squarehead-lambda 0.1
for extra in "--induce --r 64 --logit-lambda 1" "--induce --r 128 --logit-lambda 1" "--induce --r 64 --logit-lambda 2"; do
  $S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses squarehead --squarehead-targets 0.5 \
     --squarehead-lambda 0.1 --lr masked_lora=2e-3 --extra-args="$extra"
done
# 2026-11-30 (third run): the hidden-state-only SquareHead rows still missing at 70%
$S --methods spt --targets 0.7 --losses squarehead --squarehead-lambda 0.1
$S --methods seft,spt --targets 0.7 --losses squarehead --squarehead-lambda 1

# The default recipes of sp.recover (docs/recover.md) chosen again on the validation split
# (recovery.py --eval-split validation: train on the first 90% of wiki.valid.tokens, score the last 10%),
# each scored on wiki.test.raw as well (--also-test). The extra flags are part of each row's key.
V="--eval-split validation --also-test"
$S --pruner sparsegpt --methods masked_lora --targets 0.5,0.7 --losses ce --lr masked_lora=2e-3 --extra-args="--induce $V"
$S --methods masked_lora,lora --targets 0.5,0.7,2:4 --losses ce --extra-args="$V"
$S --pruner sparsegpt --methods masked_lora --targets 0.5 --losses squarehead --squarehead-targets 0.5 \
   --squarehead-lambda 0.1 --lr masked_lora=2e-3 --extra-args="--induce --r 64 --logit-lambda 2 $V"
# Block-wise reconstruction before fine-tuning (recovery.py --reconstruct), on the validation split
for lr in 1e-4 1e-3; do
  $S --pruner sparsegpt --methods masked_lora --targets 0.7 --losses ce --lr masked_lora=2e-3 \
     --extra-args="--induce --reconstruct --reconstruct-lr $lr --reconstruct-epochs 1 $V"
done
# 2026-12-01: the default 70% recipe on the validation split, without and with reconstruction (lr 3e-3)
R70="python benchmarks/recovery.py --pruner sparsegpt --induce --sparsity 0.7 --method masked_lora --lr 2e-3 --steps 200 --seq-len 128 --batch-size 4 $V --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
$R70
$R70 --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1
# 2026-12-01 (second run): the default 50% recipe on the validation split, with reconstruction and
# without; 2026-12-02: the 2:4 candidate (SparseGPT + induction + reconstruction, now the
# 2:4 default) against the previous 2:4 default (Wanda + masked LoRA).
R50="python benchmarks/recovery.py --pruner sparsegpt --induce --sparsity 0.5 --method masked_lora --r 64 --lr 2e-3 --loss squarehead --squarehead-lambda 0.1 --logit-lambda 2 --steps 200 --seq-len 128 --batch-size 4 $V --arc-easy 500 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
$R50 --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1
$R50
R24="python benchmarks/recovery.py --pattern 2:4 --method masked_lora --steps 200 --seq-len 128 --batch-size 4 $V --arc-easy 500 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
$R24 --pruner sparsegpt --induce --lr 2e-3 --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1
$R24 --pruner wanda --lr 1e-3
# 2026-12-02: the dense model tuned first (plain LoRA, 100 steps, merged), then the 50% recipe for the
# other 100 steps with the tuned model as its teacher (two runs; --tune-dense does both in one)
python benchmarks/recovery.py --method lora --r 8 --lr 2e-3 --sparsity 0 --steps 100 --seq-len 128 --batch-size 4 $V --threads ${THREADS:-1} --cache-dir '' --save-merged runs/dense-tuned-100 --out benchmarks/results/recovery.jsonl
$R50 --model runs/dense-tuned-100 --teacher runs/dense-tuned-100 --steps 100 --seed 1 --cache-dir '' --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1
# 2026-12-03: after the same dense tuning, masked LoRA r=8 with CE in place of the 50% recipe's rank 64 with distillation
python benchmarks/recovery.py --model runs/dense-tuned-100 --teacher runs/dense-tuned-100 --pruner sparsegpt --induce --sparsity 0.5 --method masked_lora --r 8 --lr 2e-3 --loss ce --steps 100 --seq-len 128 --batch-size 4 $V --arc-easy 500 --threads ${THREADS:-1} --seed 1 --cache-dir '' --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1 --out benchmarks/results/recovery.jsonl
# 2026-12-03: each method's lr on the validation split at 70%, from the same cached SparseGPT + induction model
# (no reconstruction), CE without a loss on <unk>'s tokens; SPT prunes the dense model itself (Wanda, gradually)
SEED="python benchmarks/recovery.py --pruner sparsegpt --induce --sparsity 0.7 --steps 200 --seq-len 128 --batch-size 4 $V --skip-placeholder --arc-easy 500 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
for lr in 2e-3 4e-3 8e-3 1.6e-2; do $SEED --method masked_lora --lr $lr; done
for lr in 4e-3 8e-3 1.6e-2 3.2e-2 6.4e-2; do $SEED --method spp --lr $lr; done
for lr in 1e-3 3e-3 1e-2; do $SEED --method seft --lr $lr; done
for lr in 1e-2 3e-2 1e-1; do $SEED --method spt --lr $lr --pruner wanda --no-induce --spt-prompt-length 8 --spt-prune-steps 10; done
# then one more setting of each at its chosen lr (masked LoRA at both of its level lrs), and SPP's distillation loss
for lr in 8e-3 4e-3; do $SEED --method masked_lora --lr $lr --r 16; done
$SEED --method spp --lr 3.2e-2 --spp-r 32
$SEED --method seft --lr 3e-3 --seft-density 0.05
$SEED --method spt --lr 3e-2 --pruner wanda --no-induce --spt-prompt-length 16 --spt-prune-steps 10
$SEED --method spp --lr 3.2e-2 --loss squarehead --squarehead-lambda 0.1 --logit-lambda 1
# 2026-12-03: the 50% recipe after the dense tuning, both runs without a loss on <unk>'s tokens (now the 50% default)
python benchmarks/recovery.py --method lora --r 8 --lr 2e-3 --sparsity 0 --steps 100 --seq-len 128 --batch-size 4 $V --skip-placeholder --threads ${THREADS:-1} --cache-dir '' --save-merged runs/dense-tuned-100-skip --out benchmarks/results/recovery.jsonl
$R50 --skip-placeholder --model runs/dense-tuned-100-skip --teacher runs/dense-tuned-100-skip --steps 100 --seed 1 --cache-dir '' --reconstruct --reconstruct-lr 3e-3 --reconstruct-epochs 1
# 2026-12-03: each method's 70% choice run once at 50% and at 2:4 (same protocol as the SEED rows)
for T in "--sparsity 0.5" "--pattern 2:4"; do
    S="python benchmarks/recovery.py --pruner sparsegpt --induce $T --steps 200 --seq-len 128 --batch-size 4 $V --skip-placeholder --arc-easy 500 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl"
    $S --method masked_lora --lr 4e-3 --r 16
    $S --method spp --lr 3.2e-2 --spp-r 32
    $S --method seft --lr 3e-3
    $S --method spt --lr 3e-2 --pruner wanda --no-induce --spt-prompt-length 16 --spt-prune-steps 10
done
# 2026-12-03: SEFT at 2:4, where its 70% choice failed, on the validation split: a lower lr, and
# its 70% lr with growth only into the pruned model's nonzeros (the mask stays 2:4 as pruned)
S24="python benchmarks/recovery.py --pruner sparsegpt --induce --pattern 2:4 --steps 200 --seq-len 128 --batch-size 4 $V --skip-placeholder --arc-easy 500 --threads ${THREADS:-1} --out benchmarks/results/recovery.jsonl --method seft"
$S24 --lr 1e-3
$S24 --lr 3e-3 --seft-grow-into kept
