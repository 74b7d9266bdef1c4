#!/usr/bin/env bash
# The GPU code paths that CI (CPU only) never runs, each as a user runs it, with its exit status: extract to
# a layer3 store, fit --finetune layer4, evaluate and generate on CUDA; and torchrun (nccl) for fit and extract
# on one GPU. Run from the repository root on a GPU machine (DEVICE=cpu runs the same on a CPU, gloo):
#   CAPTIONER_BENCHMARK_DATA=DIR OUT=DIR bash benchmarks/gpu_checks.sh
set -uo pipefail
python3=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
n=${IMAGES:-512}
work=$(mktemp -d)
out=${OUT:-$work}
mkdir -p "$out"
failed=0
check() {  # check NAME COMMAND...: the command's output tail and exit status
  local name=$1
  shift
  local t0=$SECONDS
  "$@" >"$work/$name.log" 2>&1
  local rc=$?
  grep -v 'eta ' "$work/$name.log" | tail -6
  echo "=== $name: exit $rc, $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  cp "$work/$name.log" "$out/" 2>/dev/null
}
torchrun=("$python3" -m torch.distributed.run --standalone --nproc-per-node 1)
"$python3" - "$work/imgs" "$n" <<'PY'
import sys
from pathlib import Path
from benchmarks.common import flickr, write_jpegs, write_karpathy
folder, n = Path(sys.argv[1]), int(sys.argv[2])
paths = write_jpegs(folder, n, seed=3)
splits = ["train"] * (n - 2 * (n // 8)) + ["val"] * (n // 8) + ["test"] * (n // 8)
write_karpathy(folder / "dataset_flickr30k.json", [p.name for p in paths], flickr().train[:n], splits)
PY
common=(--weights none --device "$dev")
check extract_layer3 "$python3" cli.py extract --images "$work/imgs" --store "$work/l3.h5" --layer layer3 "${common[@]}"
check extract_torchrun "${torchrun[@]}" cli.py extract --images "$work/imgs" --store "$work/l4.h5" "${common[@]}"
check fit_finetune "$python3" cli.py fit --store "$work/l3.h5" --out "$work/ft" --epochs 3 --finetune layer4 \
  --finetune-after 1 --batch-size 64 --device "$dev"
check fit_torchrun "${torchrun[@]}" cli.py fit --store "$work/l4.h5" --out "$work/ddp" --epochs 2 --device "$dev"
check fit_torchrun_resume "${torchrun[@]}" cli.py fit --store "$work/l4.h5" --out "$work/ddp" --epochs 3 --resume \
  --device "$dev"
check evaluate_finetuned "$python3" cli.py evaluate --model "$work/ft/model.pt" --store "$work/l3.h5" --split test \
  --out "$work/eval.json" --device "$dev"
check generate_finetuned "$python3" cli.py generate --model "$work/ft/model.pt" --image "$work/imgs/img00000.jpg" \
  --attention "$out/attention.png" --json --device "$dev"
rm -rf "$work"
echo "=== failed checks: $failed"
exit $failed
