#!/usr/bin/env bash
# The GPU check and benchmark in one script: the GPU tests, the kernels' accuracy check and their
# benchmark grid, each stage under its own timeout, so that a short stay on a GPU machine is spent measuring.
#
# Here, once (the device image has older peft/transformers than pyproject pins; these three wheels,
# 14.5 MiB, are pure Python and the image has their other needs):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl peft==0.21.2 transformers==5.23.0 accelerate==1.15.0
# Then, on the GPU machine, with .whl/ copied beside the checkout (under 10 minutes in all):
#   bash benchmarks/gpu_run.sh
# What it leaves in $OUT: env.txt, gpu_tests.log, accuracy.log, accuracy.jsonl, grid.log, rows.jsonl,
# kernels.md, decode.log, decode.md, training_cost.log, training_cost.jsonl.
# rows.jsonl is written row by row, so a grid cut short by its timeout still returns what it measured.
# Then paste kernels.md (device, command and table) into docs/results/kernels.md, and decode.md into
# the section "Decoding from packed checkpoints" of docs/results/checkpoints.md.
#
# Stages, in the order they run, and their time limits (seconds; the sum stays under the call's 600):
#   0. tests/test_gpu.py: the SPP and SEFT layers train through the kernels on CUDA and match
#      their PyTorch path; 2:4 takes the sparse GEMM (a failure is reported, the stages go on) TESTS_S=90
#   1. training cost against peft's LoRA (benchmarks/training_cost.py): peak CUDA memory and
#      CUDA-event step times of every method, one process per row, one cell (hidden:dtype:
#      checkpointing[:batchxseq]) after another from COST_CELLS, most wanted first, until the
#      stage's time is spent (COST: arguments for every cell); rows to training_cost.jsonl as
#      they are measured, tables to training_cost.log                                COST_S=240
#   2. accuracy at small odd shapes, bf16 and fp32 (compiles every kernel; a failure here means the
#      kernels are wrong on this GPU, and the grid is skipped; running out of time does not). On
#      an H200 with Triton 3.6 the first row took most of 40 s: autotuning compiles every config
#                                                                                 ACCURACY_S=80
#   3. the grid (GRID: extra arguments to kernel_timings.py, e.g. "--quick")     GRID_S=70
#   4. greedy decoding from packed checkpoints (benchmarks/decode.py): dense, packed (the Triton
#      decode kernel) on two Llama-shaped random decoder layers, 50% and 70%, tokens/s and
#      memory; exits 1 if packed tokens differ from dense past a near-tie (DECODE: its arguments)
#                                                                                 DECODE_S=40
# KERNELS_ARGS go to stages 2 and 3: KERNELS_ARGS="--device cpu" GRID="--shapes 40x24 --tokens 1,20"
# DECODE="--device cpu --model random --hidden 256 --intermediate 512 --layers 2 --vocab 512"
# COST="--device cpu --tiny --warmup 0 --steps 1" COST_CELLS="128:fp32:off"
# rehearses the whole script on a machine without a GPU (the kernels in Triton's interpreter).
set -uo pipefail
# shellcheck disable=SC2086 # KERNELS_ARGS and GRID are lists of arguments
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The package from this checkout without pip's dependency resolution (the image's torch is older
# than pyproject's pin).
SITE=$(mktemp -d)
cp -r sparse_peft "$SITE/"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 3
fi
export PYTHONPATH=$SITE

{ nvidia-smi; python3 -c "import torch, triton, peft, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
if ! python3 -c "import sparse_peft.ops" >> "$OUT/env.txt" 2>&1; then
    echo "import sparse_peft failed (carry the wheels named at the top):"; cat "$OUT/env.txt"; exit 3
fi
tail -1 "$OUT/env.txt"

tests_status=0
if [ -z "${KERNELS_ARGS:-}" ]; then  # the layers take the kernels for CUDA inputs only
    # -P: $SITE alone supplies the packages, whatever the checkout holds beside them
    TRITON_INTERPRET=0 timeout "${TESTS_S:-90}" python3 -P -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        > "$OUT/gpu_tests.log" 2>&1 || tests_status=$?
    tail -3 "$OUT/gpu_tests.log"
fi

# Each cell appends its rows as they are measured; a cell cut short by the stage's end keeps those.
cost_status=0
cost_deadline=$((SECONDS + ${COST_S:-240}))
# A row took about 20 s on an H200 (the interpreter's start, the model, autotuning in the warm-up).
for cell in ${COST_CELLS:-2048:bf16:off 2048:bf16:off:8x1024 1024:bf16:off 2048:fp32:off 2048:bf16:on \
                         1024:fp32:off 1024:bf16:on 2048:fp32:on 1024:fp32:on}; do
    IFS=: read -r hidden dtype ckpt tokens <<< "$cell"
    left=$((cost_deadline - SECONDS))
    if [ "$left" -lt 20 ]; then echo "training cost: the stage's time ran out before cell $cell"; break; fi
    shape=()
    [ -n "$tokens" ] && shape=(--batch "${tokens%x*}" --seq-len "${tokens#*x}")
    echo "== cell $cell" >> "$OUT/training_cost.log"
    timeout "$left" python3 benchmarks/training_cost.py ${COST:---device cuda --warmup 2 --steps 5} --hidden "$hidden" \
        --dtypes "$dtype" --checkpointing "$ckpt" "${shape[@]}" --out "$OUT/training_cost.jsonl" \
        >> "$OUT/training_cost.log" 2>&1 || cost_status=$?
done
grep -h "^| \|failed" "$OUT/training_cost.log" | grep -v "^| method\|^|---" | tail -40

status=0
for dtype in bfloat16 float32; do
    timeout $((${ACCURACY_S:-80} / 2)) python3 benchmarks/kernel_timings.py ${KERNELS_ARGS:-} --shapes 37x45,130x33,64x96 \
        --tokens 1,5,16,33 --sparsities 0.5,0.9 --dtype "$dtype" --rep 5 --jsonl "$OUT/accuracy.jsonl" \
        >> "$OUT/accuracy.log" 2>&1 || { rc=$?; if [ "$status" -eq 0 ] || [ "$status" -eq 124 ]; then status=$rc; fi; }
done  # a wrong result in either dtype outranks running out of time in the other
grep -h "FAILED\|Error\|error" "$OUT/accuracy.log" | head -20
if [ "$status" -eq 124 ]; then  # out of time is no wrong result: the rows it measured are in accuracy.log
    echo "accuracy: the stage's time ran out after $(grep -c '^{' "$OUT/accuracy.jsonl" 2>/dev/null || echo 0) rows"
elif [ "$status" -ne 0 ]; then
    echo "accuracy stage failed (status $status): see accuracy.log; the grid was not run"; exit "$status"
else
    echo "accuracy: every op matches its reference at the small shapes"
fi

timeout "${GRID_S:-70}" python3 benchmarks/kernel_timings.py ${KERNELS_ARGS:-} ${GRID:-} --jsonl "$OUT/rows.jsonl" \
    --markdown "$OUT/kernels.md" 2>&1 | tee "$OUT/grid.log"
grid_status=${PIPESTATUS[0]}

# Rows are printed as they are measured, so a stage cut short by its timeout still logs them.
timeout "${DECODE_S:-40}" python3 benchmarks/decode.py ${DECODE:---device cuda --layers 2 --repeats 3} \
    --markdown "$OUT/decode.md" > "$OUT/decode.log" 2>&1
decode_status=$?
tail -12 "$OUT/decode.log"

[ "$cost_status" -ne 0 ] && echo "training-cost stage failed (status $cost_status): see training_cost.log"
[ "$tests_status" -ne 0 ] && echo "tests/test_gpu.py failed (status $tests_status): see gpu_tests.log"
[ "$decode_status" -ne 0 ] && echo "decode stage failed (status $decode_status): see decode.log"
[ "$grid_status" -ne 0 ] && exit "$grid_status"
[ "$tests_status" -ne 0 ] && exit "$tests_status"
exit "$decode_status"
