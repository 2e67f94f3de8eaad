#!/usr/bin/env bash
# Every GPU check of the training system in one command, for a session lent a GPU (one H100/H200-class device):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # from the repository root; OUT_DIR defaults to $OUT or gpu_check
#
# 1. the `gpu`-marked tests (models in bf16 on CUDA, the inferer on CUDA);
# 2. benchmarks/bench_train.py at the seed's patch (configs/base.yaml: 8 -> 40 x 192x192, bf16) in one run: the VAE
#    stage, the latent encode, and the diffusion stage on pixel shards, on latent shards and on latent shards
#    compiled, with the step split into phases (device syncs at phase boundaries); pixel and latent again without
#    phase timing (the throughput figures), and those two under DeepSpeed ZeRO-2 with one process
#    (launch/zero2.yaml) against the plain process, when deepspeed imports. (Under DeepSpeed the optimizer step
#    runs inside backward, so its phase split charges the step to "backward".)
# 3. benchmarks/bench_infer.py: whole-series regression inference of the 28 -> 140 slice 512x512 case with the demo
#    and base models (random weights), beside the CPU figure in docs/usage.md.
# 4. benchmarks/bench_real.py with configs/real_gpu.yaml: one leave-one-patient-out fold (the head CT held out) at
#    1500 steps, when the real thin CT series are beside the checkout (../shared/data; else it reports them skipped).
# Goals (issue 16): diffusion stage >= 10 samples/s and >= 35% MFU per GPU. Each step writes its JSON/log under
# OUT_DIR; a failing step is reported and the next one still runs, and bench_train.json is rewritten after every
# run (a time limit keeps what was measured; the compile variant runs last). At most 19 minutes (never run yet).
#
# A machine without network access needs ctld's pure-Python dependencies (diffusers, webdataset, pydicom, nibabel,
# the pylibjpeg plugins, deepspeed) beside its own torch: put their wheels in .whl/ and this script installs them
# into /tmp/site first (pip --no-index), then runs ctld from this checkout (PYTHONPATH).
set -uo pipefail
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' | tee "$out/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, never stop the script
    local name="$1" limit="$2"; shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || { status=1; tail -n 30 "$out/$name.log"; }
}

step gpu_tests 180 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_models.py tests/test_inference.py
launch=()
python3 -c "import deepspeed" 2>/dev/null && launch=(--launch launch/zero2.yaml)
[ ${#launch[@]} -eq 0 ] && echo "deepspeed does not import here: the ZeRO-2 comparison is skipped"
step bench_infer 90 python3 benchmarks/bench_infer.py --device cuda --presets configs/demo.yaml,configs/base.yaml \
    --slices 28 --steps 0 --out "$out/bench_infer.json"
step bench_train 480 python3 benchmarks/bench_train.py --preset gpu --steps 20 --warmup 5 \
    --variants pixel,latent,pixel_nophases,latent_nophases,latent_compile "${launch[@]}" \
    --out "$out/bench_train.json"
step bench_real 420 python3 benchmarks/bench_real.py --config configs/real_gpu.yaml --folds head_cptac \
    --diffusion_steps 1500 --modes regression --out "$out/bench_real" --json "$out/bench_real.json"
exit $status
