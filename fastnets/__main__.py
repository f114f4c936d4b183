"""python -m fastnets info | bench [--ops ...] [--quick] [--out DIR] | kernels [--kernel ...] [--arch ...]"""
from __future__ import annotations

import argparse
import platform
import sys


def info() -> None:
    import importlib.metadata as md

    import torch

    from . import _config, _dispatch, _ext

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    ok, why = _ext.status()
    print(f"fastnets {md.version('fastnets') if version('fastnets') != 'not installed' else '(source tree)'}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton   {version('triton')}")
    print(f"device   {device}")
    print(f"TRITON_INTERPRET={'1' if _config.interpret_requested() else 'unset'}  "
          f"FASTNETS_BACKEND={_config.forced_backend() or 'unset'}")
    print(f"fastnets._C: {'available' if ok else 'unavailable'} ({why})")
    rows = _dispatch.backend_report()
    width = max(len(r["op"]) for r in rows)
    print(f"\n{'op':<{width}}  {'backend':<9}  why")
    for r in rows:
        print(f"{r['op']:<{width}}  {r['backend']:<9}  {r['why']}{'  [CUDA kernel available]' if r['cuda_kernel'] else ''}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and which backend each op uses and why")
    bench = sub.add_parser("bench", help="benchmark ops against torch eager / torch.compile / peers")
    bench.add_argument("--ops", nargs="*", default=None, help="op names or families (default: all)")
    bench.add_argument("--quick", action="store_true", help="few sizes, short timing (smoke run)")
    bench.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    bench.add_argument("--merge", action="store_true",
                       help="keep other families' rows already in the results file (a GPU run in parts)")
    kern = sub.add_parser("kernels", help="static report: compile every kernel specialization for sm_90a (no GPU "
                                          "needed) and read registers, spills, shared memory, occupancy, tensor cores")
    kern.add_argument("--family", nargs="*", default=None, help="launcher families (default: all)")
    kern.add_argument("--kernel", nargs="*", default=None, help="only kernels whose name contains one of these")
    kern.add_argument("--dtype", nargs="*", default=None, choices=("fp16", "bf16", "fp32", "fp64", "-"))
    kern.add_argument("--arch", nargs="*", default=["sm_90a"], choices=("sm_90a", "sm_80"))
    kern.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    kern.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    kern.add_argument("--no-cache", action="store_true", help="recompile every specialization")
    kern.add_argument("--sample", action="store_true", help="only the first specialization of each kernel")
    kern.add_argument("--check", action="store_true", help="exit 1 when a specialization breaks a gate")
    kern.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.command == "kernels":
        # The report compiles the real kernels: Triton's interpreter must not wrap them.
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        from .bench import static
        return static.main(args)
    if args.command == "info":
        info()
        return 0
    from .bench import run
    run(ops=args.ops, quick=args.quick, out=args.out, plots=not args.no_plots, merge=args.merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
