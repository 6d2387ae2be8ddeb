#!/usr/bin/env bash
# Every GPU check of the project in one run, most important first, each under its own time limit
# and all under one deadline, so a short time on a GPU gets all it can:
#   1. environment (GPU, driver, torch, CUDA, cuDNN, MONAI)
#   2. materialised attention, per score and per op (benchmarks/attention_memory.py)
#   3. planner vs measured on configs/grids/gpu_validation.yaml (`voxgen profile --grid`)
#   4. the tests marked gpu
#   5. the cohort's 4x KL and VQ autoencoders trained on the GPU, scored by `voxgen evaluate`
#   6. latent diffusion on the cohort with the KL run (benchmarks/latent_diffusion.py)
# Results go to $WORK (default: a temporary folder), packed after each check into
# $OUT/results.tgz (checkpoints left out). Pipe the output to $OUT/log.txt to keep the log.
#
#   OUT=/tmp/gpu DATA=/path/to/cohort bash benchmarks/gpu_checks.sh [DEADLINE_SECONDS]
#
# DATA is a template cohort (`voxgen data cohort --out DATA`, default 24 cases at 32x48x40).
set -u
OUT=${OUT:?set OUT to the folder for results}
DATA=${DATA:?set DATA to a template cohort}
DEADLINE=$((SECONDS + ${1:-500}))
WORK=${WORK:-$(mktemp -d)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
voxgen() { python3 -m voxgen.cli "$@"; }
# Checkpoints stay behind: results.tgz stays small enough to copy back from the GPU machine.
pack() { tar czf "$OUT/results.tgz" --exclude=checkpoints --exclude='*.safetensors' --exclude=cache -C "$WORK" . ; }

# run NAME SECONDS COMMAND...: COMMAND under a limit of SECONDS or what is left before the deadline.
run() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
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
    nvidia-smi
    python3 -c 'import monai, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, MONAI {monai.__version__}")
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory)'
  } 2>&1 | tee "$WORK/environment.txt"
}

autoencoder() {  # NAME PRESET STEPS
  voxgen train --config "configs/autoencoders/$2" "data.root=$DATA" "run.dir=$WORK/$1" "training.steps=$3" \
    training.val_every=500 training.checkpoint_every=500 training.ema_decay=0.999
}

export -f voxgen environment autoencoder
export WORK DATA
mkdir -p "$OUT"
run environment 30 environment
run attention 90 python3 benchmarks/attention_memory.py --device cuda --out "$WORK/attention"
run profile 220 voxgen profile --grid configs/grids/gpu_validation.yaml --out "$WORK/profile"
run gpu-tests 90 python3 -m pytest -m gpu -q -p no:cacheprovider --timeout 60 tests
run kl-train 80 autoencoder kl kl_4x_cohort.yaml 700
run kl-score 30 voxgen evaluate --run "$WORK/kl"
run vq-train 80 autoencoder vq vqvae_4x_cohort.yaml 700
run vq-score 30 voxgen evaluate --run "$WORK/vq"
run latent-diffusion 120 python3 benchmarks/latent_diffusion.py --autoencoder "$WORK/kl" --data "$DATA" \
  --steps 1000 --out "$WORK/latent-diffusion.md"
pack
echo "=== done $(date +%T), $((SECONDS))s"
