#!/usr/bin/env bash
# The GPU figures of one lent-GPU session, in priority order, each section under its own time limit (a
# section that runs out is lost, the others still run). Run from the repository root on the GPU machine:
#   CAPTIONER_BENCHMARK_DATA=DIR OUT=DIR bash benchmarks/gpu_session.sh
# DIR holds flickr30k-captions/dataset_flickr30k.json.gz, and may hold photos/*.jpg (real Flickr photos: extract
# then also compares nvjpeg's features with Pillow's on them); python3 must have torch, torchvision, h5py, typer,
# rich, matplotlib and pycocoevalcap (its cider module is enough: PYTHONPATH may point at a copy).
# The limits add up to 710 s (about 12 minutes), with the start-up of the machine inside a 15-minute lease.
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
# extract first: GPU JPEG decoding (--decode gpu) against Pillow in workers, never measured yet (2026-12);
# 2,048 JPEGs written (~25 s), 6 extract runs and the feature comparison (the CPU-only section took 40 s)
section 120 extract
# fit50 is measured (2026-11-26: 17-20 min projected from 7 epochs); 140 s of training still gives 5-6 epochs
CAPTIONER_FIT50_BUDGET=${CAPTIONER_FIT50_BUDGET:-140} section 210 fit50
section 170 epoch
section 60 fit --quick
# not yet measured on a GPU: the compiled cell (fit --compile) at the report's batch, against the first row
CAPTIONER_FIT50_EPOCHS=3 CAPTIONER_FIT50_ARGS="--compile" section 150 fit50
