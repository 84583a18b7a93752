#!/usr/bin/env bash
# The speed checks (issues 7 and 18) in one command, for a GPU machine without internet (see benchmarks/README.md):
#   here:  bash benchmarks/diffsynth_min.sh      # the reference's three modules -> .diffsynth-min/
#          python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
#   there: bash benchmarks/gpu_check.sh          # carrying .whl and .diffsynth-min; logs + JSON go to $OUT
# SIZE=tiny ENTITIES=0,2 OPARGS="--device cpu --heads 2 --side 8 --segment 16 --iters 1" checks it on a CPU;
# VARIANTS overrides the regional_attention.py variants (RAARGS: its other arguments), WHEELS the wheel folder (default .whl), E2EARGS the
# arguments of generate_e2e.py (whole images; its size follows SIZE: tiny stays tiny, anything else is flux-dev).
# QWEN=1 adds whole Qwen-Image images (qwen-image: 20B random bf16 weights, about 40 GB; SIZE=tiny: qwen-tiny), with
# QWEN_E2EARGS as their arguments; off by default, as it does not fit one 15-minute device session with the rest.
# FAMILIES=1 adds every model family at its released transformer's shapes with random bf16 weights
# (family_overhead.py --shapes real: one forward at 1024x1024, stock processors, EliGen with 0 and 4 entities in the
# dense, flex and segmented forms; SIZE=tiny: the tiny pipelines' whole images instead, on a CPU), with FAMILY_ARGS as
# its arguments. Off by default: estimated (not yet run on a GPU) at 8-10 minutes on an H200 for the eight released
# transformers (FLUX.1-dev, Qwen-Image, Qwen-Image 2.1, FLUX.2 [dev] and [klein] 4B / 9B, Z-Image, Krea 2: 4-32B
# each, 25 forwards each, flex compiled once per model), which with the rest does not fit one 15-minute session.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/.diffsynth-min${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 benchmarks/attention_op.py ${OPARGS:-} --json "$dest/attention_op.json" 2>&1 | tee "$dest/attention_op.log"
python3 benchmarks/regional_attention.py --size "${SIZE:-flux-dev}" --entities "${ENTITIES:-0,4}" \
    --variants "${VARIANTS:-dense,reference,diffsynth,segmented,trim,compile-plain,compile-flex,compile-segmented}" \
    ${RAARGS:-} --json "$dest/regional_attention.json" 2>&1 | tee "$dest/regional_attention.log"
e2e_size=$([ "${SIZE:-flux-dev}" = tiny ] && echo tiny || echo flux-dev)
# defaults sized by estimate (not yet run on a GPU): about 9 minutes at flux-dev on an H200, two images a row
python3 benchmarks/generate_e2e.py --size "$e2e_size" ${E2EARGS:---entities 4 --warmup 0 --iters 1 --variants \
plain,exact,reference,fbc-0.5,fp8,entity-steps-15,mask-every-2,compile-plain,compile,model-offload} \
    --json "$dest/generate_e2e.json" 2>&1 | tee "$dest/generate_e2e.log"
if [ -n "${QWEN:-}" ]; then
    qwen_size=$([ "${SIZE:-flux-dev}" = tiny ] && echo qwen-tiny || echo qwen-image)
    python3 benchmarks/generate_e2e.py --size "$qwen_size" ${QWEN_E2EARGS:---entities 4 --warmup 0 --iters 1 \
--variants plain,exact,reference,fbc-0.5} --json "$dest/generate_e2e_qwen.json" 2>&1 | tee "$dest/generate_e2e_qwen.log"
fi
if [ -n "${FAMILIES:-}" ]; then
    family_shapes=$([ "${SIZE:-flux-dev}" = tiny ] && echo tiny || echo real)
    python3 benchmarks/family_overhead.py --shapes "$family_shapes" ${FAMILY_ARGS:---warmup 1 --iters 3} \
        --json "$dest/family_overhead.json" 2>&1 | tee "$dest/family_overhead.log"
fi
# Context parallelism (docs/design.md section 24): Ulysses over every GPU when there are 2 or more, the EliGen image
# compared with the single-device one. A lent machine has one GPU and 2 ranks need 2 devices, so there the check runs
# 2 gloo ranks on the CPU at the tiny size (the equality only, no speed) and says so. CP=0 skips it; CP_SIZE is the
# multi-GPU size (default flux-dev), CP_ARGS further arguments of context_parallel.py.
if [ "${CP:-1}" != 0 ]; then
    gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -ge 2 ]; then
        cp_run=(--nproc_per_node "$gpus" benchmarks/context_parallel.py --device cuda --size "${CP_SIZE:-flux-dev}")
        : > "$dest/context_parallel.log"
    else
        echo "context parallelism: $gpus GPU(s) here; 2 ranks need 2 devices, so 2 gloo ranks run on the CPU at the" \
            "tiny size (the equality with one device, not the speed)" | tee "$dest/context_parallel.log"
        cp_run=(--nproc_per_node 2 benchmarks/context_parallel.py --device cpu --size tiny)
    fi
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python3 -m torch.distributed.run --standalone "${cp_run[@]}" ${CP_ARGS:-} \
        --json "$dest/context_parallel.json" 2>&1 | tee -a "$dest/context_parallel.log"
fi
