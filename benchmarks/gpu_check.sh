#!/usr/bin/env bash
# Every GPU check of the project in one run, most important first, each under its own time limit
# and all under one deadline, so a short time on a GPU gets all it can:
#   1. environment (GPU, driver, torch, CUDA, cuDNN, MONAI)
#   2. materialised attention, per score and per op (benchmarks/attention_memory.py)
#   3. planner vs measured on configs/grids/gpu_validation.yaml (`voxgen profile --grid`), summed up in
#      memory-validation.md (benchmarks/memory_validation.py; the page is docs/memory-validation.md)
#   4. speed: voxgen's training step against the seeds' reference loop at the seeds' 270 M UNet
#      (128x128x160), and Euler 25 steps at 256x256x160 (benchmarks/speed.py, docs/speed.md); then the
#      same with voxgen's speed switches on (compile, channels-last, fused AdamW, TF32)
#   5. the tests marked gpu
#   6. the cohort's 4x KL and VQ autoencoders trained on the GPU, scored by `voxgen evaluate`
#   7. latent diffusion on the cohort with the KL run (benchmarks/latent_diffusion.py)
# Results go to $WORK (default: a temporary folder), packed after each check into
# $OUT/results.tgz (checkpoints left out). Pipe the output to $OUT/log.txt to keep the log.
#
#   OUT=/tmp/gpu DATA=/path/to/cohort bash benchmarks/gpu_check.sh [DEADLINE_SECONDS]
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --dry-run [DEADLINE_SECONDS]     (or DRY_RUN=1)
#
# DATA is a template cohort (`voxgen data cohort --out DATA`, default 24 cases at 32x48x40).
# PYTHON is the interpreter that has voxgen's dependencies (default: python3); SKIP="NAME ..." leaves
# out the checks of those names (the names the log prints after ===).
#
# The dry run tests this script without a GPU: every check runs on the CPU at tiny sizes (a tiny cohort
# is made when DATA is unset), each under three times its limit. On two shared cores (load average 4 to
# 7) the checks other than latent-diffusion took 2.5 to 3.5 minutes, latent-diffusion (five `voxgen`
# runs and sampling) about 3.5 more. Two checks cannot measure anything there:
# `voxgen profile` loads and validates the whole grid, then stops with "needs a CUDA GPU" (exit 2), and
# memory-validation.md is then written from the committed H200 measurement
# (benchmarks/measured/gpu_validation_h200.csv) instead of this run's.
set -u
DRY=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
OUT=${OUT:?set OUT to the folder for results}
WORK=${WORK:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ((DRY)); then
  DEADLINE=$((SECONDS + ${1:-1200}))
  DATA=${DATA:-$WORK/cohort}
  MEASURED=benchmarks/measured/gpu_validation_h200.csv
  # Tiny UNet at 16^3 with sdpa (the reference is always MONAI's materialised attention).
  SPEED=(--device cpu --shape 16,16,16 --warmup 1 --steps 1 --repeats 2 --sample-steps 2
    "model.channels=[8,16]" "model.attention_levels=[false,true]" model.num_head_channels=8 model.norm_num_groups=8
    model.attention=sdpa)
  # No compile: compiling on the CPU would take most of the dry run.
  SWITCHES=(training.channels_last=true training.fused_optimizer=true training.tf32=true)
  AE_STEPS=2
  AE_EXTRA=("data.shape=[16,16,16]" training.device=cpu)
  LATENT_STEPS=4
  LATENT_EXTRA=(--shape 16 16 16)
  GPU_TESTS=$(grep -rl --include='*.py' "pytest.mark.gpu" tests)
else
  DEADLINE=$((SECONDS + ${1:-500}))
  DATA=${DATA:?set DATA to a template cohort}
  MEASURED=$WORK/profile/profile.csv
  # The seeds' exp1 UNet (270 M parameters) at 128x128x160; voxgen with sdpa, the reference as the seeds ran it.
  SPEED=(--device cuda --config configs/unet_pixel_exp1_128.yaml --sample-shape 160,256,256 --warmup 3 --steps 3
    --repeats 5 model.attention=sdpa)
  SWITCHES=(training.compile=true training.channels_last=true training.fused_optimizer=true training.tf32=true)
  AE_STEPS=700
  AE_EXTRA=()
  LATENT_STEPS=1000
  LATENT_EXTRA=()
  GPU_TESTS=tests
fi
voxgen() { "$PYTHON" -m voxgen.cli "$@"; }
# Checkpoints stay behind: results.tgz stays small enough to copy back from the GPU machine.
pack() { tar czf "$OUT/results.tgz" --exclude=checkpoints --exclude='*.safetensors' --exclude=cache --exclude=cohort -C "$WORK" . ; }

# run NAME SECONDS COMMAND...: COMMAND under a limit of SECONDS or what is left before the deadline.
run() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  # On a shared CPU a check can take several times its usual time: the dry run tests the script, not speed.
  ((DRY)) && limit=$((limit * 3))
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "=== $name: skipped (SKIP)"
    return
  fi
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "=== $name: skipped, ${left}s left"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local began=$SECONDS
  timeout "$limit" bash -c '"$@"' _ "$@"
  echo "=== $name: exit $?, $((SECONDS - began))s"
  pack
}

environment() {
  {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    "$PYTHON" -c 'import monai, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, MONAI {monai.__version__}")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory)
else:
    print("no CUDA GPU")'
  } 2>&1 | tee "$WORK/environment.txt"
}

autoencoder() {  # NAME PRESET STEPS [OVERRIDES...]
  voxgen train --config "configs/autoencoders/$2" "data.root=$DATA" "run.dir=$WORK/$1" "training.steps=$3" \
    training.val_every=500 training.checkpoint_every=500 training.ema_decay=0.999 "${@:4}"
}

export -f voxgen environment autoencoder
export WORK DATA PYTHON
mkdir -p "$OUT" "$WORK"
if ((DRY)) && [[ ! -d $DATA/test ]]; then
  voxgen data cohort --out "$DATA" --cases 6 --shape 16 16 16 >/dev/null
fi
run environment 30 environment
if ((DRY)); then
  run attention 90 "$PYTHON" benchmarks/attention_memory.py --device meta --out "$WORK/attention"
else
  run attention 90 "$PYTHON" benchmarks/attention_memory.py --device cuda --out "$WORK/attention"
fi
run profile 220 voxgen profile --grid configs/grids/gpu_validation.yaml --out "$WORK/profile"
run memory-validation 20 "$PYTHON" benchmarks/memory_validation.py --profile "$MEASURED" --out "$WORK/memory-validation.md"
run speed 120 "$PYTHON" benchmarks/speed.py "${SPEED[@]}" --json "$WORK/speed/speed.json"
run speed-switches 240 "$PYTHON" benchmarks/speed.py "${SPEED[@]}" "${SWITCHES[@]}" --json "$WORK/speed/switches.json"
# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
run gpu-tests 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --timeout 60 $GPU_TESTS
run kl-train 80 autoencoder kl kl_4x_cohort.yaml "$AE_STEPS" "${AE_EXTRA[@]}"
run kl-score 30 voxgen evaluate --run "$WORK/kl"
run vq-train 80 autoencoder vq vqvae_4x_cohort.yaml "$AE_STEPS" "${AE_EXTRA[@]}"
run vq-score 30 voxgen evaluate --run "$WORK/vq"
run latent-diffusion 120 "$PYTHON" benchmarks/latent_diffusion.py --autoencoder "$WORK/kl" --data "$DATA" \
  --steps "$LATENT_STEPS" "${LATENT_EXTRA[@]}" --out "$WORK/latent-diffusion.md"
pack
echo "=== done $(date +%T), $((SECONDS))s"
