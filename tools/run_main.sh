#!/usr/bin/env bash
# The main job on the embedded default data (a synthetic multi-region 3D set, generated and cached on first use):
#   1. train the foundation teacher (bundles/foundation_seg)      4. export one region expert as a standalone bundle
#   2. decompose it into region experts (bundles/lorkd_seg)       5. verify that bundle and run its inference
#   3. evaluate teacher / unfused model / fused experts region by region (bundles/lorkd_seg/eval/regions.md)
# Extra arguments are passed to both training runs (e.g. --epochs 8). Set MEDFM_SKIP_TEACHER=1 to reuse a teacher.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1
run() { echo; echo "[main] $*"; "$@"; }

if [ "${MEDFM_SKIP_TEACHER:-0}" != 1 ] || [ ! -f bundles/foundation_seg/models/model.pt ]; then
  run $PY -m monai.bundle run --config_file bundles/foundation_seg/configs/train.json "$@"
fi
run $PY -m monai.bundle run --config_file bundles/lorkd_seg/configs/train.json "$@"
run $PY -m monai.bundle run --config_file "['bundles/lorkd_seg/configs/train.json','bundles/lorkd_seg/configs/evaluate.json']"
region=brain_mri
out=bundles/lorkd_seg/eval/expert_$region
run $PY tools/export_expert_bundle.py from_lorkd --bundle_root bundles/lorkd_seg --region "$region" --out_dir "$out" --verify
echo; echo "[main] region table (bundles/lorkd_seg/eval/regions.md):"; cat bundles/lorkd_seg/eval/regions.md
echo "[main] standalone expert bundle for '$region': $out"
