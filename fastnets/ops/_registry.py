"""Lazy access to the kernel modules: `import fastnets` never imports triton."""
from __future__ import annotations

import importlib


def kernels(family: str):
    """fastnets.kernels.<family>, imported on first use."""
    return importlib.import_module(f"fastnets.kernels.{family}")
