#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs the MONAI Label server.
#
#   bash tools/monailabel_env.sh [VENV_DIR]        # default: <repo>/.venv-label
#
# Why a separate environment: monailabel 0.8.5 drags numpy < 2 and DICOM stacks that the
# training environment does not want. What is pinned and why:
#   - torch 2.13.0, CPU build: taken from /opt/wheels when that folder exists (--find-links);
#     a constraint keeps every later step from swapping it for a CUDA build.
#   - torchvision 0.28.0: the release that pairs with torch 2.13. monailabel imports it at module
#     level (monailabel/transform/post.py: torchvision.utils.make_grid/save_image, imported by the
#     bundle infer task), so it must be importable. PyPI only has CUDA builds of torchvision; their
#     compiled ops (`_C.so`) need libtorch_cuda and do not load next to the CPU torch. torchvision
#     tolerates that for most registrations, but two `register_fake("torchvision::nms"/"qnms")`
#     decorators are unguarded and make `import torchvision` fail ("operator torchvision::nms does
#     not exist"). This script guards them exactly like torchvision guards its other ones
#     (`extension._has_ops()`). Result: the real torchvision with all pure-Python parts working
#     (utils, transforms, models); the compiled detection ops (nms, roi_align, ...) raise
#     torchvision's own "Couldn't load custom C++ ops" error if called. The radiology bundle
#     infer/train path of MONAI Label does not call them.
#   - pydicom<3, pynetdicom<3, dicomweb-client<0.60: with newer releases the server fails at start
#     (`pydicom._storage_sopclass_uids`).
#   - monai 1.6.1: the version the medfm bundles are written and verified with.
#
# Idempotent: an existing environment that passes the health check is reused as is (~10 s); an unhealthy one is
# repaired in place. Measured here (2 cores): 269 s with an empty pip cache, 160 s with a warm one. Concurrent calls
# for one folder run one after the other (a lock), so .ci/run can start it in the background.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-${REPO_ROOT}/.venv-label}"
PYTHON="${PYTHON:-python3}"

MONAILABEL_VERSION="0.8.5"
MONAI_VERSION="1.6.1"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
WHEEL_DIR="/opt/wheels"

health_check() {
    "${VENV_DIR}/bin/python" - "${MONAILABEL_VERSION}" "${TORCH_VERSION}" <<'EOF'
import sys
import warnings

warnings.simplefilter("ignore")
import torch
import torchvision
from torchvision.utils import make_grid

import monailabel
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: F401  (imports torchvision too)
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: F401

want_label, want_torch = sys.argv[1], sys.argv[2]
assert monailabel.__version__.startswith(want_label), f"monailabel {monailabel.__version__} != {want_label}"
assert torch.__version__.split("+")[0] == want_torch, f"torch {torch.__version__} != {want_torch}"
assert make_grid(torch.zeros(2, 3, 4, 4)).ndim == 3
print(f"monailabel {monailabel.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
EOF
}

# One creator at a time: a second call (the MONAI Label tests while .ci/run creates the environment in the
# background) waits here for the first, then finds the environment healthy and reuses it. The lock file lies in the
# temporary folder, named after the environment's absolute path (nothing is written into an existing environment).
mkdir -p "$(dirname "${VENV_DIR}")"
LOCK="${TMPDIR:-/tmp}/medfm-monailabel-env-$(realpath -m "${VENV_DIR}" | sha256sum | cut -c1-16).lock"
exec 9>"${LOCK}"
flock 9

if [[ -x "${VENV_DIR}/bin/python" ]] && report=$(health_check 2>/dev/null); then
    echo "monailabel_env: reusing healthy environment ${VENV_DIR}: ${report}"
    exit 0
fi

start=$(date +%s)
echo "monailabel_env: creating ${VENV_DIR}"
if [[ ! -x "${VENV_DIR}/bin/python" ]]; then
    "${PYTHON}" -m venv "${VENV_DIR}"
fi
PIP=("${VENV_DIR}/bin/python" -m pip install --disable-pip-version-check --no-input)

FIND_LINKS=()
TORCH_SPEC="torch==${TORCH_VERSION}"
if [[ -d "${WHEEL_DIR}" ]] && compgen -G "${WHEEL_DIR}/torch-${TORCH_VERSION}+cpu-*.whl" >/dev/null; then
    FIND_LINKS=(--find-links "${WHEEL_DIR}")
    TORCH_SPEC="torch==${TORCH_VERSION}+cpu"
fi

CONSTRAINTS="${VENV_DIR}/medfm-label-constraints.txt"
cat >"${CONSTRAINTS}" <<EOF
${TORCH_SPEC}
torchvision==${TORCHVISION_VERSION}
monai==${MONAI_VERSION}
pydicom<3
pynetdicom<3
dicomweb-client<0.60
EOF

# torch first, alone, so that nothing else can pick the CUDA build.
"${PIP[@]}" "${FIND_LINKS[@]}" "${TORCH_SPEC}"
# torchvision without its dependencies: its only hard one is torch (pinned above) + numpy/pillow,
# which monailabel's own requirements bring.
"${PIP[@]}" --no-deps "torchvision==${TORCHVISION_VERSION}"
"${PIP[@]}" "${FIND_LINKS[@]}" -c "${CONSTRAINTS}" \
    "monailabel==${MONAILABEL_VERSION}" "monai==${MONAI_VERSION}" \
    "pydicom<3" "pynetdicom<3" "dicomweb-client<0.60" pillow numpy

# Guard torchvision's two unguarded fake-kernel registrations (see header). Idempotent.
"${VENV_DIR}/bin/python" - <<'EOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
marker = "def _fake_if_ops(qualname):"
if marker not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    if anchor not in text:
        raise SystemExit(f"monailabel_env: unexpected {path}; cannot add the _has_ops guard")
    helper = (
        anchor
        + "\n\n"
        + marker
        + "  # added by medfm tools/monailabel_env.sh: CPU torch cannot load the CUDA-built _C.so\n"
        + "    if torchvision.extension._has_ops():\n"
        + "        return torch.library.register_fake(qualname)\n"
        + "    return lambda fn: fn\n"
    )
    text = text.replace(anchor, helper, 1).replace("@torch.library.register_fake(", "@_fake_if_ops(")
    path.write_text(text)
    print(f"monailabel_env: guarded fake registrations in {path}")
EOF

health_check
echo "monailabel_env: ready in $(( $(date +%s) - start )) s: ${VENV_DIR}/bin/monailabel"
