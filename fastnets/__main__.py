"""python -m fastnets info | bench [--ops ...] [--quick] [--out DIR]"""
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
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    from .bench import run
    run(ops=args.ops, quick=args.quick, out=args.out, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
