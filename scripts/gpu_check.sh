#!/usr/bin/env bash
# GPU smoke check (issue 17), also `make gpu-check`.
#
# On a machine with CUDA: trains configs/tiny.toml for one epoch on the GPU (then one more short
# run with --amp bf16, and a 2-process torchrun when there are two GPUs), certifies the run with
# `lipmargin certify --device cuda` and `--device cpu`, and fails unless the certified Lipschitz
# bounds (global value and every pairwise K[t, i]) agree to 1e-6 relative and the certified radii
# of every test point to 1e-4. Elsewhere it prints "no CUDA device, skipped" and exits 0.
#
# Environment: PYTHON (default .venv/bin/python, else python3), DATA_DIR (default
# $LIPMARGIN_DATA_DIR, else ./data; must hold MNIST: `lipmargin data fetch`), N (test points,
# default 1000).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device, skipped"
  exit 0
fi
DATA_DIR="${DATA_DIR:-${LIPMARGIN_DATA_DIR:-data}}"
N="${N:-1000}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
lm() { "$PYTHON" -m lipmargin "$@"; }

"$PYTHON" -c 'import torch; print("gpu_check:", torch.__version__, torch.cuda.get_device_name(0))'
lm train --config "$REPO/configs/tiny.toml" --device cuda --out "$OUT/run" --data-dir "$DATA_DIR" --quiet
for dev in cuda cpu; do
  lm certify "$OUT/run" --device "$dev" --data-dir "$DATA_DIR" --n "$N" --json "$OUT/$dev.json" --quiet
done
lm train --config "$REPO/configs/tiny.toml" --device cuda --amp bf16 --set augment=shift \
  --set loader=dataloader --set num_workers=2 --out "$OUT/amp" --data-dir "$DATA_DIR" --quiet
lm audit "$OUT/amp" --device cuda --data-dir "$DATA_DIR" --n 200 --no-cw --quiet
if [[ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m lipmargin train \
    --config "$REPO/configs/tiny.toml" --device cuda --out "$OUT/ddp" --data-dir "$DATA_DIR" --quiet
fi

"$PYTHON" - "$OUT" "$DATA_DIR" "$N" <<'PY'
import json, sys

import torch

from lipmargin.certify import certify
from lipmargin.data import load_dataset
from lipmargin.runs import load_run

out, data_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
x, y = load_dataset("mnist", "test", data_dir)
x, y = x[:n], y[:n]
got = {}
for dev in ("cuda", "cpu"):
    model, bound, _, _, _ = load_run(f"{out}/run", device=dev)
    cert = bound.certified()
    radii = torch.cat([certify(model, x[i:i + 500].to(dev), y[i:i + 500].to(dev), cert).cpu()
                       for i in range(0, len(x), 500)])
    pair = None if cert.pairwise is None else cert.pairwise.double().cpu()
    got[dev] = (cert.value, pair, radii)
(vg, pg, rg), (vc, pc, rc) = got["cuda"], got["cpu"]
fail = []
if abs(vg - vc) > 1e-6 * abs(vc):
    fail.append(f"bound: cuda {vg!r} vs cpu {vc!r}")
if (pg is None) != (pc is None) or (pg is not None and ((pg - pc).abs() > 1e-6 * pc.abs()).any()):
    fail.append("pairwise bounds differ by more than 1e-6 relative")
worst = float((rg - rc).abs().max())
if worst > 1e-4:
    fail.append(f"radii differ by up to {worst:.3g} (> 1e-4)")
jg, jc = (json.load(open(f"{out}/{d}.json")) for d in ("cuda", "cpu"))
if abs(jg["lipschitz_bound"] - jc["lipschitz_bound"]) > 1e-6 * abs(jc["lipschitz_bound"]):
    fail.append("lipmargin certify --json: bounds differ")
print(f"gpu_check: bound cuda {vg:.10g} cpu {vc:.10g}; largest radius difference {worst:.3g} "
      f"over {len(rc)} points; certified accuracy cuda {jg['certified_accuracy']} "
      f"cpu {jc['certified_accuracy']}")
if fail:
    print("gpu_check: FAILED: " + "; ".join(fail))
    sys.exit(1)
print("gpu_check: OK")
PY
