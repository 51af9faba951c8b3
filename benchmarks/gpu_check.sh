#!/usr/bin/env bash
# Every GPU check of the repo in one go, on a CUDA machine with no network (nothing from the hub), in
# under 8 minutes on one GPU (the step limits below sum to 7 minutes; setup takes the rest):
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. `python -m benchmarks` on a random-weight GPT-2-small-shaped model in bf16: harvest against a plain
#    forward, the training step's tokens/s and MFU at the paper's shape (bf16 among the candidates), the
#    loader's rows/s from an int8 cache (decoded on the device) against the fastest step's demand, eval
#    tokens/s with the prefix shared; 2. one BatchTopK and one TopK step at the paper's shape in bf16 taken
#    apart (benchmarks/step.py: the matmul's share, the largest kernels); 3. the real pipeline on that model
#    and the bundled sample: sae harvest, a 3-SAE sweep at m 12288 in bf16 (radix selection, b_dec at the
#    median, θ calibrated on the held-out chunk), sae eval; 4. the quick suite with CUDA visible.
# Each step has its own time limit, so a slow one cannot take the others' results with it.
# The repo is installed (editable, no index); wheels in .whl/, if any, go to /tmp/site first.
set -uo pipefail
out=$(realpath -m "${1:-gpu_out}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/steps.txt"
python3 -c "import torch, transformers, zarr, pyarrow; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'zarr', zarr.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$out/steps.txt"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}

python3 -m benchmarks.models /tmp/gpt2s >/dev/null
step bench 170 python3 -m benchmarks --gpt2-small --tokens 5e5 --batch-contexts 256 \
    --model-dtype bfloat16
step step 45 python3 -m benchmarks.step --shape paper --device cuda --precision bf16
repo=$PWD
mkdir -p /tmp/pipeline && cd /tmp/pipeline && cp "$repo/pipeline.toml" . && {
    step pipeline 100 bash -c "sae harvest --model /tmp/gpt2s --layer 8 --tokens 1.2e6 --batch-contexts 256 \
        --model-dtype bfloat16 \
        && time sae train --cache caches/* --arch batchtopk,topk,jumprelu --k 32 --dict-size 12288 --precision bf16 \
        && time sae eval runs/batchtopk_k32_m12288 runs/topk_k32_m12288 --tokens 65536"
    tar czf "$out/runs.tgz" runs/*/*.json runs/*/*.jsonl runs/*/*.md 2>/dev/null
    cd "$repo"
}
step tests 120 python3 -m pytest -q -m "not slow" -p no:cacheprovider
grep -h "passed\|failed\|error" "$out/tests.log" | tail -3
tail -12 "$out/bench.log" | cut -c1-150
grep -h "^|" "$out/step.log" | head -4
tail -8 "$out/pipeline.log" | cut -c1-200
cat "$out/steps.txt"
