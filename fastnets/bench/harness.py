"""The one benchmark harness: timing, device ceilings, results files, plots, tables.

On CUDA: triton.testing.do_bench (CUDA events, warm-up, median and 20/80% quantiles),
inputs rotated over enough copies to exceed L2 so timings are of HBM, not cache; achieved
GB/s (TFLOP/s) is reported against ceilings measured in the same run: a 1 GiB
device-to-device copy and 8192^3 bf16 and fp32 matmuls. Every row also carries its
roofline: the lower-bound time of its bytes at the copy bandwidth and of its FLOPs at the
matmul rate, and the fraction of that bound the measurement reaches.

Before timing, each case checks fastnets' output (and input gradients) against torch's on
the same inputs (fastnets.reference.tolerances); a fastnets implementation that raises or
disagrees makes the run fail, naming the case. A peer that is not installed is skipped; a
peer that fails is reported and does not fail the run.

On a CPU the same cases run end to end (Triton interpreter vs torch reference on tiny sizes)
as a functional run: its times are labelled as such and are not speed figures.
"""
from __future__ import annotations

import dataclasses
import functools
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable

import torch

MODES = ("fwd", "bwd", "fwd_bwd")
L2_BYTES = 50 * 2**20  # H100 / H200: 50 MiB; rotating 2x this defeats the cache


@dataclasses.dataclass
class Case:
    """One op at one size. `make_inputs(device)` returns fresh inputs (floating ones with
    requires_grad); each impl maps them to an output. bytes_* are the minimal traffic of
    one call (each input read once, each output written once), used for GB/s."""

    family: str
    op: str
    label: str
    size: int                      # x-axis of the plots
    dtype: torch.dtype
    make_inputs: Callable
    impls: dict
    bytes_fwd: int
    bytes_bwd: int
    modes: tuple = MODES
    # Compute-bound ops (convolution): useful FLOPs of one call, reported as TFLOP/s
    # against the measured bf16 matmul rate. 0 for memory-bound ops.
    flops_fwd: int = 0
    flops_bwd: int = 0
    # Correctness check before timing: the relative norm error of fastnets' output against
    # the "torch" impl's; None takes the dtype's bench_rel (whole models: a loose bound).
    check_rel: float | None = None


class CaseFailure(Exception):
    """fastnets itself raised or computed something wrong on a benchmark case."""


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element: the cases' traffic formulas."""
    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn)


def peers(torch_fn, device: torch.device) -> dict:
    """What a case is measured against: the torch function itself and, on a GPU, its
    torch.compile'd version."""
    out = {"torch": torch_fn}
    if device.type == "cuda":
        out["torch.compile"] = compiled(torch_fn)
    return out


def is_ours(impl_name: str) -> bool:
    return impl_name.startswith("fastnets")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug if device.type == "cuda" else "cpu-functional"


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense bf16 / fp32 matmul rates
    (fp32 under torch's TF32 setting), measured on this device now; the denominators of every
    'fraction of peak' and of the rooflines we report."""
    if device.type != "cuda":
        return {"copy_gbps": None, "matmul_bf16_tflops": None, "matmul_fp32_tflops": None,
                "note": "CPU functional run: no ceilings"}
    from triton.testing import do_bench
    rep = 40 if quick else 100

    def copy_gbps(n=2**28):  # 1 GiB of float32; freed when this returns
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        return 2 * n * 4 / do_bench(lambda: dst.copy_(src), warmup=25, rep=rep, return_mode="median") / 1e6

    def matmul_tflops(dtype, m=8192):  # random data: zeros run faster than real inputs
        a = torch.randn(m, m, device=device, dtype=dtype)
        b = torch.randn(m, m, device=device, dtype=dtype)
        return 2 * m**3 / do_bench(lambda: a @ b, warmup=25, rep=rep, return_mode="median") / 1e9

    return {"copy_gbps": copy_gbps(), "matmul_bf16_tflops": matmul_tflops(torch.bfloat16),
            "matmul_fp32_tflops": matmul_tflops(torch.float32),
            "fp32_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def roofline_ms(nbytes: int, nflops: int, dtype: torch.dtype, ceilings: dict) -> float | None:
    """Lower-bound time of one call: its bytes at the copy bandwidth or its FLOPs at the
    matmul rate of its dtype, whichever takes longer (None without ceilings)."""
    copy = ceilings.get("copy_gbps")
    rate = ceilings.get("matmul_fp32_tflops" if dtype in (torch.float32, torch.float64) else "matmul_bf16_tflops")
    if not copy or not rate:
        return None
    return max(nbytes / copy / 1e6, nflops / rate / 1e9)


def _time(fn: Callable, device: torch.device, quick: bool, grad_to_none=None) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench
        q = do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, grad_to_none=grad_to_none,
                     quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up (interpreter: rewrites the kernel once)
    samples = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples), max(samples)


def _input_sets(case: Case, device: torch.device) -> list:
    per_set = max(case.bytes_fwd, 1)
    count = 1 if device.type != "cuda" else max(1, min(8, -(-2 * L2_BYTES // per_set)))
    return [case.make_inputs(device) for _ in range(count)]


def _tensors(inputs) -> list:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _floating_leaves(inputs) -> list:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(case: Case, device: torch.device) -> str | None:
    """fastnets' output and input gradients against the "torch" impl's on one input set
    (same values, same upstream gradient). Returns what is wrong with fastnets, or None; a
    torch impl that cannot run leaves nothing to compare with (None)."""
    if "torch" not in case.impls:
        return None
    from ..reference.tolerances import TOLERANCES
    bound = case.check_rel if case.check_rel is not None else TOLERANCES[case.dtype].bench_rel
    inputs = case.make_inputs(device)
    backward = "bwd" in case.modes or "fwd_bwd" in case.modes

    def run(name, g=None):
        copies = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
        out = case.impls[name](*copies)
        grads = []
        if backward and out.requires_grad:
            if g is None:
                g = torch.randn_like(out)
            grads = list(torch.autograd.grad(out, _floating_leaves(copies), g.to(out.dtype), allow_unused=True))
        return out, grads, g

    try:
        ref_out, ref_grads, g = run("torch")
    except Exception:   # the peer cannot run this case: nothing to compare with
        return None
    problems = []
    for name in (n for n in case.impls if is_ours(n)):
        try:
            out, grads, _ = run(name, g)
        except Exception as exc:
            problems.append(f"{name} raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        if out.shape != ref_out.shape:
            problems.append(f"{name}: output shape {tuple(out.shape)} != torch's {tuple(ref_out.shape)}")
            continue
        err = _rel_err(out, ref_out)
        if not err <= bound:
            problems.append(f"{name}: output relative error {err:.3g} > {bound:.3g}")
        for i, (gr, rg) in enumerate(zip(grads, ref_grads)):
            if gr is not None and rg is not None and not (err := _rel_err(gr, rg)) <= bound:
                problems.append(f"{name}: gradient of input {i} relative error {err:.3g} > {bound:.3g}")
    return "; ".join(problems) or None


def run_case(case: Case, device: torch.device, quick: bool, ceilings: dict) -> list[dict]:
    """Time every impl in every mode. Raises CaseFailure (after timing the peers) when a
    fastnets impl raises or fails the correctness check."""
    failures = []
    problem = check_case(case, device)
    if problem:
        failures.append(f"correctness: {problem}")
    sets = _input_sets(case, device)
    rows = []
    for impl_name, fn in case.impls.items():
        for mode in case.modes:
            it = {"i": 0}

            def next_inputs():
                it["i"] = (it["i"] + 1) % len(sets)
                return sets[it["i"]]

            leaves = [t for s in sets for t in _tensors(s)]
            nbytes, nflops = 0, 0
            try:
                if mode == "fwd":
                    call = lambda: fn(*next_inputs())  # noqa: E731
                    nbytes, nflops = case.bytes_fwd, case.flops_fwd
                else:
                    outs = [fn(*s) for s in sets]
                    grads = [torch.randn_like(o) for o in outs]
                    if mode == "bwd":
                        def call():
                            next_inputs()
                            outs[it["i"]].backward(grads[it["i"]], retain_graph=True)
                        nbytes, nflops = case.bytes_bwd, case.flops_bwd
                    else:
                        def call():
                            s = next_inputs()
                            fn(*s).backward(grads[it["i"]])
                        nbytes, nflops = case.bytes_fwd + case.bytes_bwd, case.flops_fwd + case.flops_bwd
                median, lo, hi = _time(call, device, quick, grad_to_none=leaves)
                peak = None
                if device.type == "cuda" and mode == "fwd_bwd":
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    call()
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                error = None
            except Exception as exc:
                median = lo = hi = peak = None
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                if isinstance(exc, ImportError) and not is_ours(impl_name):
                    error = "skipped (not installed): " + error
                elif is_ours(impl_name):
                    failures.append(f"{impl_name} {mode}: {error}")
            # A functional (CPU interpreter) run reports times only: no GB/s, no speedups.
            gpu = device.type == "cuda"
            gbps = nbytes / median / 1e6 if (median and gpu) else None
            tflops = nflops / median / 1e9 if (median and nflops and gpu) else None
            bound = roofline_ms(nbytes, nflops, case.dtype, ceilings) if gpu else None
            label = impl_name
            if not gpu:
                label = {"fastnets": "fastnets (interpreter)", "torch": "torch (reference)"}.get(impl_name, impl_name)
            copy = ceilings.get("copy_gbps")
            rate = ceilings.get("matmul_fp32_tflops" if case.dtype in (torch.float32, torch.float64)
                                else "matmul_bf16_tflops")
            rows.append({
                "family": case.family, "op": case.op, "label": case.label, "size": case.size,
                "dtype": str(case.dtype).replace("torch.", ""), "impl": label, "mode": mode,
                "ms_median": median, "ms_p20": lo, "ms_p80": hi, "bytes": nbytes, "flops": nflops, "gbps": gbps,
                "frac_of_copy_bw": (gbps / copy) if (gbps and copy) else None, "tflops": tflops,
                "frac_of_matmul": (tflops / rate) if (tflops and rate) else None,
                "roofline_ms": bound, "frac_of_roofline": (bound / median) if (bound and median) else None,
                "peak_mem_mib": peak, "error": error,
            })
            for t in leaves:
                t.grad = None
    if failures:
        raise CaseFailure(f"{case.op} {case.label} {str(case.dtype).replace('torch.', '')}: " + " | ".join(failures),
                          rows)
    return rows


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _gpu_state() -> dict | None:
    """Clocks, power limit, memory and driver as nvidia-smi reports them now."""
    fields = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "temperature.gpu", "pcie.link.gen.current")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    values = [v.strip() for v in out[0].split(",")]
    return dict(zip(fields, values))


def environment(device: torch.device, command: str, quick: bool) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "device": device_name(device), "functional_run": device.type != "cuda", "quick": quick,
        "gpu": _gpu_state() if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": version("triton"), "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_commit": _git_commit(), "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "liger_kernel": version("liger-kernel"),
    }


def speedups(rows: list[dict], functional: bool = False) -> None:
    """Adds speedup_vs_torch: the torch eager time over this impl's, same case and mode."""
    if functional:
        for r in rows:
            r["speedup_vs_torch"] = None
        return
    base = {(r["op"], r["label"], r["dtype"], r["mode"]): r["ms_median"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        b = base.get((r["op"], r["label"], r["dtype"], r["mode"]))
        r["speedup_vs_torch"] = (b / r["ms_median"]) if (b and r["ms_median"]) else None


def table(rows: list[dict], ceilings: dict) -> str:
    headers = ["op", "shape", "dtype", "mode", "impl", "ms", "bound ms", "% roofline", "GB/s", "% copy BW", "TFLOP/s",
               "% matmul", "x torch", "peak MiB"]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else ("error" if v is None else str(v))

    body = [[r["op"], r["label"], r["dtype"], r["mode"], r["impl"],
             fmt(r["ms_median"], ".4f") if not r["error"] else ("skipped" if r["error"].startswith("skipped")
                                                                else "error"),
             fmt(r.get("roofline_ms"), ".4f") if r.get("roofline_ms") else "-",
             fmt(100 * r["frac_of_roofline"], ".0f") if r.get("frac_of_roofline") else "-",
             fmt(r["gbps"], ".0f") if r["gbps"] else "-",
             fmt(100 * r["frac_of_copy_bw"], ".0f") if r["frac_of_copy_bw"] else "-",
             fmt(r.get("tflops"), ".1f") if r.get("tflops") else "-",
             fmt(100 * r["frac_of_matmul"], ".0f") if r.get("frac_of_matmul") else "-",
             fmt(r["speedup_vs_torch"], ".2f") if r.get("speedup_vs_torch") else "-",
             fmt(r["peak_mem_mib"], ".0f") if r["peak_mem_mib"] is not None else "-"] for r in rows]
    try:
        from tabulate import tabulate
        text = tabulate(body, headers=headers, tablefmt="github")
    except ImportError:
        text = "\n".join(" | ".join(map(str, line)) for line in [headers] + body)
    if ceilings.get("copy_gbps"):
        text += (f"\n\nceilings measured in this run: copy {ceilings['copy_gbps']:.0f} GB/s, "
                 f"bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s, fp32 matmul "
                 f"{ceilings.get('matmul_fp32_tflops') or 0:.0f} TFLOP/s. bound ms: the roofline, max(bytes / copy "
                 f"bandwidth, FLOPs / matmul rate); % roofline: bound / measured.")
    return text


def plot(rows: list[dict], ceilings: dict, out_dir: str, title: str) -> list[str]:
    """One PNG per op family: a panel per (op, mode), GB/s vs size, a line per impl and dtype,
    the measured copy bandwidth dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'fastnets[bench]')")
        return []
    paths = []
    # GB/s on a GPU; a functional run has no speed figures, so it plots plain milliseconds.
    gpu = any(r["gbps"] for r in rows)
    for family in sorted({r["family"] for r in rows}):
        # Compute-bound families plot TFLOP/s, memory-bound ones GB/s.
        compute = gpu and any(r.get("tflops") for r in rows if r["family"] == family)
        metric, ylabel = (("tflops", "TFLOP/s") if compute else ("gbps", "GB/s")) if gpu else \
            ("ms_median", "ms (functional run)")
        fam = [r for r in rows if r["family"] == family and r[metric]]
        panels = sorted({(r["op"], r["mode"]) for r in fam}, key=lambda p: (p[0], MODES.index(p[1])))
        if not panels:
            continue
        cols = 3
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, (op, mode) in zip(axes.flat, panels):
            sel = [r for r in fam if r["op"] == op and r["mode"] == mode]
            for impl, dtype in sorted({(r["impl"], r["dtype"]) for r in sel}):
                pts = sorted((r["size"], r[metric]) for r in sel if r["impl"] == impl and r["dtype"] == dtype)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if dtype == "bfloat16" else "--", label=f"{impl} {dtype}")
            if metric == "gbps" and ceilings.get("copy_gbps"):
                ax.axhline(ceilings["copy_gbps"], color="gray", linestyle=":", label="copy BW")
            if metric == "tflops" and ceilings.get("matmul_bf16_tflops"):
                ax.axhline(ceilings["matmul_bf16_tflops"], color="gray", linestyle=":", label="bf16 matmul")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}")
            ax.set_xlabel("size")
            ax.set_ylabel(ylabel)
            if metric == "ms_median":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{family}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
