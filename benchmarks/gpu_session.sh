#!/usr/bin/env bash
# The GPU figures of one lent-GPU session, in priority order, each section under its own time limit (a
# section that runs out is lost, the others still run). Run from the repository root on the GPU machine:
#   CAPTIONER_BENCHMARK_DATA=DIR OUT=DIR bash benchmarks/gpu_session.sh
# DIR holds flickr30k-captions/dataset_flickr30k.json.gz, and may hold photos/*.jpg (real Flickr photos: extract
# then also compares nvjpeg's features with Pillow's on them); python3 must have torch, torchvision, h5py, typer,
# rich, matplotlib and pycocoevalcap (its cider module is enough: PYTHONPATH may point at a copy).
# The limits add up to 580 s, inside one 600 s run call, with the start-up of the machine inside a 15-minute lease.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, torch, torchvision, h5py; print(sys.version.split()[0], torch.__version__, torchvision.__version__, h5py.__version__)'
df -h "${TMPDIR:-/tmp}" | tail -1
free -g | head -2
section() {  # section SECONDS NAME [extra args]
  local limit=$1 name=$2
  shift 2
  echo "=== $(date +%T) $name (limit ${limit}s)"
  timeout "$limit" python3 -m benchmarks.run --device cuda --out "$out/results.json" --only "$name" "$@"
  echo "=== $(date +%T) $name: exit $?"
}
# One `run` call may last 600 s and a session has ~15 minutes of device time with the start: the sections
# below fit in 580 s, most wanted first. Each is lost alone if it runs out.
# 1. extract: GPU JPEG decoding (--decode gpu) against Pillow in workers, never measured yet (2026-12);
#    2,048 JPEGs written (~25 s), 6 extract runs and the feature comparison (the CPU-only section took 40 s)
section 100 extract
# 2. time to quality (issue 20): fit's batch-32 run over 6 epochs (at most 150 s) sets the target val loss, then
#    three larger batches with rate rules and warm-ups race to it, each stopped at the epoch that reaches it (or
#    after 70 s). Each race's result is also logged as it ends, so a section cut short keeps the finished ones.
CAPTIONER_TTQ_EPOCHS=${CAPTIONER_TTQ_EPOCHS:-6} CAPTIONER_TTQ_BUDGET=${CAPTIONER_TTQ_BUDGET:-150} \
  CAPTIONER_TTQ_RACE_BUDGET=${CAPTIONER_TTQ_RACE_BUDGET:-70} \
  CAPTIONER_TTQ_RUNS=${CAPTIONER_TTQ_RUNS:-"batch 32 (fit's default)=--batch-size 32;256, lr x sqrt(8), warm-up 100=--batch-size 256 --lr 2.83e-3 --warmup-steps 100;256, lr x 8, warm-up 200=--batch-size 256 --lr 8e-3 --warmup-steps 200;1024, lr x sqrt(32), warm-up 100=--batch-size 1024 --lr 5.66e-3 --warmup-steps 100"} \
  section 390 ttq
# 3. SCST epochs at Flickr30k scale (1 cross-entropy epoch, then SCST), batch 256
CAPTIONER_FIT50_EPOCHS=3 CAPTIONER_FIT50_ARGS="--batch-size 256 --scst-after 1" section 90 fit50
# Measured before (2026-11-26), rerun only with time to spare: `section 170 epoch`, `section 60 fit --quick`,
# and the compiled cell: CAPTIONER_FIT50_EPOCHS=3 CAPTIONER_FIT50_ARGS="--compile" section 150 fit50
