"""Triton kernels and their launchers, one module per kernel family.

Installed as ``fastnets.kernels`` (never import a top-level ``kernels``). Importing this
package imports triton but touches no GPU. Whether the kernels are compiled for the GPU
or run by Triton's CPU interpreter is fixed when a module here is first imported, by
TRITON_INTERPRET (fastnets sets it for FASTNETS_BACKEND=interpret).
"""
if __name__ == "kernels":
    # This folder is a package only as ``fastnets.kernels`` (pyproject's package-dir). Python
    # still finds it as a top-level ``kernels`` whenever the repository root is on sys.path
    # (``python -m pytest`` or ``python -m fastnets`` from the root, ``python -c`` there), and
    # that name belongs to Hugging Face's ``kernels``, which transformers imports. A namespace
    # portion would lose to an installed package, but with none installed it would still
    # import this folder as ``kernels``. So under that name this file hands the import over
    # to the next ``kernels`` on sys.path outside this repository (the import system returns
    # what we leave in sys.modules), or fails exactly as if this folder were not there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repository = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))

    def _outside_this_repository(entry) -> bool:
        try:
            return _os.path.realpath(_os.fspath(entry) or _os.curdir) != _repository
        except TypeError:   # a non-path sys.path entry (path hooks accept any object)
            return True

    _spec = _machinery.PathFinder.find_spec(__name__, [p for p in _sys.path if _outside_this_repository(p)])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
