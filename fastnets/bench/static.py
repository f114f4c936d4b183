"""The static kernel report: what the compiled code of every kernel says about its speed,
read on a machine without a GPU (`python -m fastnets kernels`).

Every specialization fastnets.bench.launches records is compiled by Triton for the target
(sm_90a: Hopper; sm_80: Ampere) with the ptxas Triton itself picks for that target (the one
matching the PTX version it emits), and read:

- registers per thread and spill stores / loads (bytes per thread), from ptxas -v;
- shared memory per CTA (Triton's dynamic allocation);
- resident CTAs and warps per SM, from registers, shared memory and warps (occupancy);
- the tensor-core instruction its dots use (wgmma, mma.sync or none), from the PTX, and
  the shapes of its dots (from the Triton IR), so a missing wgmma can be told from a tile
  that is too small for one;
- TMA use (cp.async.bulk.tensor) and compile time.

Results are cached by the specialization's identity (kernel source hash included), Triton
version and target, in FASTNETS_CACHE_DIR and in the committed results file, so an
unchanged kernel is never compiled twice. The gates the test suite enforces on these
results are `gate_failures` below.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .launches import ARCHS, Launch

# Bump when what a result holds changes: older cached results are then recompiled.
SCHEMA = 2

# Per-SM resources (CUDA occupancy calculator, compute capability 9.0 and 8.0).
LIMITS = {
    "sm_90a": dict(regs_per_sm=65536, max_regs_per_thread=255, smem_per_sm=233472, smem_per_block=232448,
                   smem_reserved_per_block=1024, max_warps=64, max_ctas=32),
    "sm_80": dict(regs_per_sm=65536, max_regs_per_thread=255, smem_per_sm=167936, smem_per_block=166912,
                  smem_reserved_per_block=1024, max_warps=64, max_ctas=32),
}
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_DOT = re.compile(r"tt\.dot\b[^\n]*?:\s*tensor<(\d+)x(\d+)x(\w+)[^>]*>\s*\*\s*tensor<(\d+)x(\d+)x\w+")


def occupancy(arch: str, registers: int, smem: int, num_warps: int) -> tuple[int, int]:
    """(resident CTAs per SM, resident warps per SM)."""
    lim = LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // num_warps
    by_smem = lim["smem_per_sm"] // (smem + lim["smem_reserved_per_block"]) if smem <= lim["smem_per_block"] else 0
    by_warps = lim["max_warps"] // num_warps
    ctas = max(0, min(by_regs, by_smem, by_warps, lim["max_ctas"]))
    return ctas, ctas * num_warps


def _tensor_core(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def _dots(ttir: str) -> list[str]:
    """'MxNxK dtype' of every tt.dot in the kernel (A is M x K, B is K x N)."""
    return [f"{m}x{n}x{k} {ty}" for m, k, ty, _, n in _DOT.findall(ttir)]


def compile_launch(launch: Launch, arch: str) -> dict:
    """Compile one specialization and read its resources. Never raises: a failure is a result."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = {"key": launch.key, "kernel": launch.kernel, "dtype": launch.dtype, "case": launch.case,
           "constants": launch.constants(), "num_warps": launch.options.get("num_warps"),
           "num_stages": launch.options.get("num_stages"), "error": None}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                                      target=GPUTarget("cuda", ARCHS[arch], 32), options=launch.options)
    except Exception as exc:  # every failing specialization is reported, not just the first
        row.update(compile_s=round(time.perf_counter() - start, 2),
                   error=f"{type(exc).__name__}: {str(exc)[:1500]}")
        return row
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    if not regs or not spill or "cubin" not in compiled.asm:
        row.update(compile_s=round(time.perf_counter() - start, 2),
                   error=f"no ptxas report captured (Triton's cache hit?): {text[-300:]!r}")
        return row
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    registers = int(regs.group(1))
    smem = int(md.shared)
    ctas, warps = occupancy(arch, registers, smem, md.num_warps)
    row.update(
        registers=registers, stack_bytes=int(spill.group(1)), spill_stores=int(spill.group(2)),
        spill_loads=int(spill.group(3)), smem=smem, ctas_per_sm=ctas, warps_per_sm=warps,
        occupancy=round(warps / LIMITS[arch]["max_warps"], 3), tensor_core=_tensor_core(ptx),
        tma="cp.async.bulk.tensor" in ptx, dots=_dots(compiled.asm.get("ttir", "")),
        compile_s=round(time.perf_counter() - start, 2))
    return row


# --- gates ------------------------------------------------------------------------------------

def wgmma_eligible(row: dict) -> bool:
    """An fp16/bf16 specialization whose dots are big enough for Hopper's warpgroup MMA:
    M a multiple of 64 (one warpgroup's rows) and whole warpgroups."""
    if row.get("dtype") not in ("fp16", "bf16") or not row.get("dots"):
        return False
    if (row.get("num_warps") or 0) % 4:
        return False
    return any(int(d.split("x")[0]) % 64 == 0 and int(d.split("x")[1].split()[0]) % 8 == 0 for d in row["dots"])


def gate_failures(rows: list[dict], arch: str, spill_allowed=lambda row: False) -> list[str]:
    """Every gate a specialization breaks, one line each: it compiles; no spill stores (unless
    `spill_allowed(row)`); wgmma where the dot tiles allow it (sm_90a); shared memory within
    the per-block limit; at least one CTA resident per SM."""
    lim = LIMITS[arch]
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['dtype']}] {r['constants']} warps={r['num_warps']} stages={r['num_stages']} " \
                f"({r['case']})"
        if r.get("error"):
            out.append(f"does not compile: {where}: {r['error'][:300]}")
            continue
        if r["spill_stores"] and not spill_allowed(r):
            out.append(f"spills {r['spill_stores']} B/thread ({r['registers']} registers): {where}")
        if arch == "sm_90a" and wgmma_eligible(r) and r["tensor_core"] != "wgmma":
            out.append(f"uses {r['tensor_core']} where wgmma fits (dots {r['dots']}): {where}")
        if r["smem"] > lim["smem_per_block"]:
            out.append(f"needs {r['smem']} B shared memory > {lim['smem_per_block']}: {where}")
        if r["ctas_per_sm"] < 1:
            out.append(f"no CTA fits on an SM: {where}")
    return out


# --- cache ------------------------------------------------------------------------------------

def _triton_version() -> str:
    import triton
    return triton.__version__


def results_dir() -> Path:
    """benchmarks/results of the source tree fastnets runs from."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


# The Triton whose report is static-<arch>.json (the one pip installs today); reports of
# other versions (the lent GPU machines' 3.6) carry their version in the file name.
NEWEST_TRITON = "3.9"


def results_stem(arch: str) -> str:
    """static-sm90a for the newest Triton the project runs; static-sm90a-triton3.6 for others."""
    ver = ".".join(_triton_version().split(".")[:2])
    return f"static-{arch.replace('_', '')}" + ("" if ver == NEWEST_TRITON else f"-triton{ver}")


def _cache_file(arch: str) -> Path:
    from fastnets import _config
    return Path(_config.cache_dir()) / "static" / f"{arch}-triton{_triton_version()}-v{SCHEMA}.json"


def load_cache(arch: str, seed_files=()) -> dict:
    """key -> result: the user cache, plus results files of the same Triton version and schema."""
    cache: dict = {}
    for path in list(seed_files) + [_cache_file(arch)]:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        env = data.get("environment", {})
        if env.get("triton") == _triton_version() and env.get("arch") == arch and data.get("schema") == SCHEMA:
            cache.update({r["key"]: r for r in data["specializations"] if not r.get("error")})
    return cache


def save_cache(arch: str, rows: list[dict]) -> None:
    path = _cache_file(arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = load_cache(arch)
        old.update({r["key"]: r for r in rows if not r.get("error")})
        tmp = path.with_suffix(f".{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"schema": SCHEMA, "environment": {"triton": _triton_version(), "arch": arch},
                       "specializations": list(old.values())}, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs recompiling next time


# --- the run ----------------------------------------------------------------------------------

_WORK: list = []   # (launch, arch) for forked workers


def _compile_index(i: int) -> dict:
    launch, arch = _WORK[i]
    return compile_launch(launch, arch)


def _cost(launch: Launch) -> int:
    """Rough compile cost, so the slow kernels start first and the pool ends together."""
    name = launch.kernel
    base = 8 if "attn" in name else 6 if "conv" in name else 1
    return base * (2 if launch.dtype in ("fp32", "fp64") else 1)


def compile_all(launches: list[Launch], arch: str, jobs: int | None = None, use_cache: bool = True,
                seed_files=(), progress=None) -> tuple[list[dict], int]:
    """Results for every launch (from the cache where the key is known); returns (rows, compiled)."""
    cache = load_cache(arch, seed_files) if use_cache else {}
    todo = [i for i, launch in enumerate(launches) if launch.key not in cache]
    results: dict[int, dict] = {}
    for i, launch in enumerate(launches):
        if launch.key in cache:
            # The measurements are the cached ones; where it came from is this run's driver.
            results[i] = dict(cache[launch.key], case=launch.case, cached=True)
    if todo:
        _WORK[:] = [(launches[i], arch) for i in todo]
        order = sorted(range(len(todo)), key=lambda j: -_cost(_WORK[j][0]))
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        with tempfile.TemporaryDirectory(prefix="fastnets-static-") as tmp:
            # A fresh Triton cache: a cache hit would skip ptxas and its report.
            os.environ["TRITON_CACHE_DIR"] = tmp
            os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
            os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            if jobs == 1:
                outs = ((j, _compile_index(j)) for j in order)
                for n, (j, row) in enumerate(outs):
                    results[todo[j]] = row
                    if progress:
                        progress(n + 1, len(todo), row)
            else:
                import multiprocessing
                with multiprocessing.get_context("fork").Pool(jobs, maxtasksperchild=64) as pool:
                    for n, (j, row) in enumerate(zip(order, pool.imap(_compile_index, order, chunksize=1))):
                        results[todo[j]] = row
                        if progress:
                            progress(n + 1, len(todo), row)
        rows = [dict(results[i], cached=False) for i in todo]
        if use_cache:
            save_cache(arch, rows)
    return [results[i] for i in range(len(launches))], len(todo)


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (kernel, dtype): the worst of its specializations."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    out = []
    for (kernel, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        spilling = [r for r in ok if r["spill_stores"]]
        tcs = sorted({r["tensor_core"] for r in ok})
        out.append({
            "kernel": kernel, "dtype": dtype, "specializations": len(rs), "errors": len(rs) - len(ok),
            "spilling": len(spilling), "worst_spill_stores": max((r["spill_stores"] for r in ok), default=0),
            "max_registers": max((r["registers"] for r in ok), default=0),
            "max_smem": max((r["smem"] for r in ok), default=0),
            "min_warps_per_sm": min((r["warps_per_sm"] for r in ok), default=0),
            "tensor_core": "/".join(f"{t} {sum(r['tensor_core'] == t for r in ok)}" for t in tcs
                                    if t != "none" or len(tcs) == 1) if ok else "-",
            "tma": sum(r["tma"] for r in ok),
            "compile_s": round(sum(r.get("compile_s", 0) for r in rs), 1),
        })
    return out


def kernel_table(rows: list[dict]) -> str:
    """One markdown line per kernel over all its dtypes: the README's table."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["kernel"], []).append(r)
    head = ("| kernel | dtypes | specializations | spilling | max regs | max smem (KB) | min warps/SM | "
            "tensor cores |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for kernel, rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        tc = {}
        for r in ok:
            tc[r["tensor_core"]] = tc.get(r["tensor_core"], 0) + 1
        tcs = ", ".join(f"{k} {v}" for k, v in sorted(tc.items()) if k != "none") or "none (no dot)"
        dtypes = "/".join(d for d in ("bf16", "fp16", "fp32", "fp64") if any(r["dtype"] == d for r in rs)) or "-"
        err = f" ({len(rs) - len(ok)} fail)" if len(ok) != len(rs) else ""
        lines.append(f"| `{kernel}` | {dtypes} | {len(rs)}{err} | {sum(1 for r in ok if r['spill_stores'])} | "
                     f"{max((r['registers'] for r in ok), default=0)} | "
                     f"{max((r['smem'] for r in ok), default=0) / 1024:.0f} | "
                     f"{min((r['warps_per_sm'] for r in ok), default=0)} | {tcs} |")
    return head + "\n".join(lines)


def _fmt_table(summary: list[dict]) -> str:
    head = ("| kernel | dtype | specs | spilling | worst spill (B/thread) | max regs | max smem (KB) | "
            "min warps/SM | tensor cores | TMA |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for s in summary:
        err = f" ({s['errors']} fail to compile)" if s["errors"] else ""
        lines.append(f"| `{s['kernel']}` | {s['dtype']} | {s['specializations']}{err} | {s['spilling']} | "
                     f"{s['worst_spill_stores']} | {s['max_registers']} | {s['max_smem'] / 1024:.0f} | "
                     f"{s['min_warps_per_sm']} | {s['tensor_core']} | {s['tma']} |")
    return head + "\n".join(lines)


LEGEND = """How to read it: one line per kernel and input dtype, the worst over every specialization a
GPU can launch (every tuner candidate, layout and option the launchers produce). *spilling*:
specializations that store registers to local memory (any spill is a slowdown; the test suite
fails on one). *max regs*: registers per thread (255 is the hardware limit). *max smem*: shared
memory per CTA. *min warps/SM*: the lowest occupancy (resident warps of 64) any specialization
gets from its registers, shared memory and warp count. *tensor cores*: how many specializations
use wgmma (Hopper's warpgroup MMA) or mma.sync (Ampere-style) for their dots; "none" for kernels
without a dot (or fp64 on FMA units)."""


def environment(arch: str, command: str) -> dict:
    import platform

    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(ARCHS[arch])
    try:
        ptxas_version = subprocess.run([ptxas.path, "--version"], capture_output=True, text=True).stdout
        ptxas_version = ptxas_version.strip().splitlines()[-2] if ptxas_version else "unknown"
    except OSError:
        ptxas_version = "unknown"
    from .harness import _git_commit
    return {"arch": arch, "triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas_version,
            "python": platform.python_version(), "git_commit": _git_commit(), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target_sms": 132}


def write(rows: list[dict], arch: str, out_dir: Path, command: str, stem: str | None = None) -> tuple[Path, Path]:
    """<out>/static-<arch>.json (every specialization) and .md (the per-kernel table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or results_stem(arch)
    env = environment(arch, command)
    summary = summarize(rows)
    clean = [{k: v for k, v in r.items() if k != "cached"} for r in rows]
    data = {"schema": SCHEMA, "environment": env, "limits": LIMITS[arch], "summary": summary,
            "specializations": clean}
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    with open(jpath, "w") as f:
        json.dump(data, f, indent=0)
    total = len(rows)
    spilling = sum(1 for r in rows if not r.get("error") and r["spill_stores"])
    errors = sum(1 for r in rows if r.get("error"))
    with open(mpath, "w") as f:
        f.write(f"# Static kernel report, {arch}\n\n{total} specializations, {spilling} spilling, {errors} failing "
                f"to compile. Triton {env['triton']} ({env['ptxas']}), commit {env['git_commit'][:10]}, "
                f"`{command}`.\n\n## Per kernel\n\n" + kernel_table(rows) + "\n\n## Per kernel and dtype\n\n"
                + _fmt_table(summary) + "\n\n" + LEGEND + "\n")
    return jpath, mpath


def print_summary(summary: list[dict], file=sys.stdout) -> None:
    cols = ("kernel", "dtype", "specs", "spill", "worst B", "regs", "smem KB", "warps/SM", "tensor cores")
    body = [(s["kernel"], s["dtype"], str(s["specializations"]) + (f" ({s['errors']} FAIL)" if s["errors"] else ""),
             str(s["spilling"]), str(s["worst_spill_stores"]), str(s["max_registers"]),
             f"{s['max_smem'] / 1024:.0f}", str(s["min_warps_per_sm"]), s["tensor_core"]) for s in summary]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)] if body else [len(c) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for b in body:
        print("  ".join(v.ljust(w) for v, w in zip(b, widths)), file=file)


def main(args) -> int:
    """python -m fastnets kernels [--family ..] [--kernel ..] [--dtype ..] [--arch ..] [--out DIR]"""
    from .launches import record
    command = "python -m fastnets kernels " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["kernels"] else "static.main"
    status = 0
    for arch in args.arch:
        t0 = time.perf_counter()
        launches = record(arch, args.family)
        if args.kernel:
            launches = [la for la in launches if any(k in la.kernel for k in args.kernel)]
        if args.dtype:
            launches = [la for la in launches if la.dtype in args.dtype]
        if args.sample:
            firsts: dict = {}
            for la in launches:
                firsts.setdefault(la.kernel, la)
            launches = list(firsts.values())
        if not launches:
            print(f"{arch}: no specialization matches the filters")
            return 2
        out = Path(args.out) if args.out else results_dir()
        stem = results_stem(arch)
        seed = [results_dir() / f"{stem}.json", out / f"{stem}.json"]

        def progress(n, total, row):
            if not args.quiet and (n == total or n % 25 == 0 or row.get("error")):
                bad = f"  FAILED {row['kernel']}: {row['error'][:200]}" if row.get("error") else ""
                print(f"  [{arch}] compiled {n}/{total} ({time.perf_counter() - t0:.0f} s){bad}", flush=True)

        rows, compiled = compile_all(launches, arch, args.jobs, use_cache=not args.no_cache, seed_files=seed,
                                     progress=progress)
        filtered = bool(args.kernel or args.dtype or args.family or args.sample)
        if not filtered or args.out:
            jpath, mpath = write(rows, arch, out, command, stem)
            where = f"wrote {jpath} and {mpath}"
        else:
            where = "filtered run: results file not written (give --out to write one)"
        print(f"\n{arch}, Triton {_triton_version()}: {len(rows)} specializations ({compiled} compiled, "
              f"{len(rows) - compiled} from the cache) in {time.perf_counter() - t0:.0f} s; {where}\n")
        print_summary(summarize(rows))
        failures = gate_failures(rows, arch)
        if failures:
            print(f"\n{len(failures)} specializations break a gate (spills, missing wgmma, shared memory, occupancy, "
                  "compile errors) before the test suite's bounded allowlist (SPILL_ALLOWLIST in "
                  "tests/test_static_kernels.py: float64 and IEEE-float32 attention); first 20:")
            print("\n".join("  " + f for f in failures[:20]))
            status = 1 if args.check else status
    return status
