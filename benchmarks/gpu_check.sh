#!/usr/bin/env bash
# The GPU path, checked on a machine with CUDA (not part of CI; CPU-only machines skip it with a
# message). Run from the repository root with the project's venv installed:
#
#     bash benchmarks/gpu_check.sh            # writes into $OUT (default /tmp/pq_gpu_check)
#
# 1. one process on cuda:0: a tiny run, its report and masked == physically smaller;
# 2. the same run on the CPU: the same masks (float results differ between devices, masks rarely);
# 3. killed in layerwise pruning and resumed on the GPU: bit for bit equal to the uninterrupted run;
# 4. with two or more GPUs: torchrun with NCCL, one job, ranks identical, masks equal to one process.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/pq_gpu_check}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same steps on the CPU (to check this script itself)
mkdir -p "$OUT"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; nothing to check" >&2
  exit 0
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if '$DEVICE' == 'cuda' else 0)")
cat > "$OUT/tiny.yaml" <<'EOF'
model: {name: resnet20, width: 0.5}
data: {name: digits, batch_size: 64, train_subset: 768, test_subset: 300, augment: false}
train: {dense_epochs: 2, epochs: 6, lr: 0.05, compress_lr: 0.02, progress: false, seed: 3,
        checkpoint_every: 5, device: DEVICE}
recipe:
  prune: {sparsity: 0.5, unit: steps, start: 2, interval: 3, refresh: 2}
  quant: {weight_bits: 4, act_bits: 4, unit: steps, weight_delay: 4, act_delay: 2}
EOF
sed -i "s/device: DEVICE/device: $DEVICE/" "$OUT/tiny.yaml"
rm -rf "$OUT"/gpu "$OUT"/cpu "$OUT"/killed "$OUT"/nccl
"$PY" -m prunequant run --config "$OUT/tiny.yaml" --out "$OUT/gpu" > "$OUT/gpu.log"
"$PY" -m prunequant run --config "$OUT/tiny.yaml" --set train.device=cpu --out "$OUT/cpu" > "$OUT/cpu.log"
_PRUNEQUANT_KILL_AFTER_STEP=30 "$PY" -m prunequant run --config "$OUT/tiny.yaml" --out "$OUT/killed" \
  > "$OUT/killed.log" 2>&1 || true
"$PY" -m prunequant run --resume "$OUT/killed" > "$OUT/resumed.log"
if [ "$NGPU" -ge 2 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m prunequant run \
    --config "$OUT/tiny.yaml" --out "$OUT/nccl" > "$OUT/nccl.log"
fi
"$PY" - "$OUT" "$NGPU" <<'EOF'
import json, sys
from pathlib import Path
import torch
out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
def st(name): return torch.load(out / name / "masked.pt", weights_only=True, map_location="cpu")
def rep(name): return json.loads((out / name / "report.json").read_text())
g, c, k = st("gpu"), st("cpu"), st("killed")
masks = [n for n in g if n.endswith(".mask")]
res = {"device": rep("gpu")["device"], "gpus": ngpu,
       "gpu_shrink_check": rep("gpu")["shrink_check"],
       "gpu_final_acc": rep("gpu")["phases"]["final"]["accuracy"],
       "cpu_final_acc": rep("cpu")["phases"]["final"]["accuracy"],
       "masks_gpu_eq_cpu": all(torch.equal(g[n], c[n]) for n in masks),
       "resume_bit_for_bit": all(torch.equal(g[n], k[n]) for n in g)
                             and rep("gpu")["phases"] == rep("killed")["phases"]}
if ngpu >= 2:
    d = st("nccl")
    res["nccl"] = rep("nccl")["processes"]
    res["nccl_masks_eq_one_process"] = all(torch.equal(g[n], d[n]) for n in masks)
print(json.dumps(res, indent=1))
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
ok = res["resume_bit_for_bit"] and res["gpu_shrink_check"]["argmax_agreement"] > 0.99
if ngpu >= 2:
    ok = ok and res["nccl"]["state_identical_on_all_ranks"]
sys.exit(0 if ok else 1)
EOF
