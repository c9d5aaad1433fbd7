#!/usr/bin/env bash
# Every accelerator figure the README's GPU section needs, for a lent GPU (device time is
# scarce: one start, then two calls back to back while the machine is warm). Each step writes
# its table under $OUT as soon as it ends and has its own time limit, so a step that hangs
# costs only itself.
#
# Prepare on the development machine (the official package is pure Python; the device image
# has jax, flax, optax, orbax, torch, matplotlib, einops, safetensors, scipy, tqdm):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl segment-anything
# then run there with carry [".whl"], in two calls that each fit the tool's 10-minute limit
# (timeout_s 560; a call's own limits below add up to 540 s):
#   bash experiments/gpu_session.sh inference   attention paths weighed (vit_h), the
#                                               side-by-side benchmark for vit_h
#   bash experiments/gpu_session.sh training    the side-by-side benchmark for vit_b, the vit_b
#                                               bf16 train step with and without block remat
# (no argument runs both, for a machine without the tool's limit), or, where the whole lease is
# 15 minutes (one start and one call), in one call of timeout_s 590 (limits add up to 560 s):
#   bash experiments/gpu_session.sh lease       the vit_h benchmark without decode-1, the vit_b
#                                               bf16 train step; stdout and stderr in one log
#                                               per step (the tool brings back 8 files at most)
set -uo pipefail
OUT=${OUT:-/tmp/sam_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi -L; python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices());
print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/device.txt"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND, output to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
    echo "   exit $? ($(date +%T))"
    tail -n 25 "$OUT/$name.txt"
}

part=${1:-all}
if [ "$part" = lease ]; then
    for spec in "benchmark_vit_h 400 experiments/benchmark.py --model vit_h --repeats 5 \
--tasks encoder,encoder-8,decode-64,amg --out-json $OUT/benchmark_vit_h.json" \
                "train_vit_b 160 experiments/train_benchmark.py --models vit_b --batch 8 \
--masks 16 --compute-dtype bfloat16 --steps 5 --out $OUT/train_vit_b_bf16"; do
        set -- $spec
        name=$1 limit=$2
        shift 2
        echo "== $name ($(date +%T), limit ${limit}s)"
        timeout "$limit" python3 "$@" >"$OUT/$name.log" 2>&1
        echo "   exit $? ($(date +%T))"
        tail -n 25 "$OUT/$name.log"
    done
fi
if [ "$part" = inference ] || [ "$part" = all ]; then
step attention_vit_h 150 python3 experiments/attention_paths.py --model vit_h --batches 1,8 \
    --repeats 10 --out-json "$OUT/attention_vit_h.json"
step benchmark_vit_h 390 python3 experiments/benchmark.py --model vit_h --repeats 10 \
    --tasks encoder,encoder-8,decode-1,decode-64,amg --out-json "$OUT/benchmark_vit_h.json" \
    --out-png "$OUT/benchmark_vit_h.png"
fi
if [ "$part" = training ] || [ "$part" = all ]; then
step benchmark_vit_b 180 python3 experiments/benchmark.py --model vit_b --repeats 10 \
    --tasks encoder,encoder-8,decode-64 --out-json "$OUT/benchmark_vit_b.json"
step train_vit_b 210 python3 experiments/train_benchmark.py --models vit_b --batch 8 --masks 16 \
    --compute-dtype bfloat16 --steps 5 --out "$OUT/train_vit_b_bf16"
step train_vit_b_remat 150 python3 experiments/train_benchmark.py --models vit_b --batch 8 \
    --masks 16 --compute-dtype bfloat16 --remat-blocks --steps 5 --no-flops \
    --out "$OUT/train_vit_b_bf16_remat"
fi
echo "done $(date +%T)"
