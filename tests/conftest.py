"""Test session setup. Runs before fastnets (and so triton) is imported by any test.

Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors: that is
how every kernel is tested in CI. Kernel outputs are NaN-poisoned before each run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTNETS_POISON"] = "1"

import pytest  # noqa: E402


def _let_torchvision_import_beside_a_cpu_torch():
    """torchvision and timm come from their own folder (scripts/env.sh: FASTNETS_VISION_PATH),
    on sys.path in the test session only. PyPI's torchvision wheels link their C extension against CUDA torch. Beside the CPU build
    the test environment installs, that extension (nms, roi_align, deform_conv2d: none of which
    fastnets or its tests use) cannot load, and `import torchvision` then fails registering a
    fake kernel for the undeclared op torchvision::nms. Declaring the two schemas it registers
    unconditionally lets the pure-Python models import; with a loadable extension nothing is
    declared here."""
    import glob
    import importlib.util
    import sys
    from fastnets import _config
    folder = _config.vision_path() or os.path.join(sys.prefix, "vision")
    if os.path.isdir(folder) and folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for so in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(so)
            return None
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_SCHEMAS = _let_torchvision_import_beside_a_cpu_torch()

HAS_CUDA = torch.cuda.is_available()
# float32 is tested as IEEE float32 against the tolerance table on a GPU too: torch's default
# lets cuDNN (and so fastnets' convolutions and recurrent cells, which follow the same flag)
# run float32 on TF32 tensor cores, whose 10-bit mantissa the float32 tolerances do not cover.
# The TF32 variants are compiled and gated by the static kernel report. On the CPU the flag
# keeps torch's default (True): CPU tensors never take TF32, in torch or in fastnets, and the
# suite runs as a CPU user's code would.
if HAS_CUDA:
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (benchmarks/gpu.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# FASTNETS_TEST_SEED: run the suite with another seed before relying on a tolerance (a bound
# that holds for one draw of the inputs only is a flaky test on another machine). Property
# tests draw the same examples on every machine by default (CI is reproducible); with a seed
# set they draw new ones.
SEED = int(os.environ.get("FASTNETS_TEST_SEED", "0"))

from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("fastnets", derandomize=SEED == 0, database=None)
_hypothesis_settings.load_profile("fastnets")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings(monkeypatch):
    """fastnets warns once per process about a fallback; every test starts as a fresh process
    would, so a test that expects the warning sees it whichever tests ran before it on its
    pytest-xdist worker."""
    from fastnets import _dispatch
    monkeypatch.setattr(_dispatch, "_warned", set())
