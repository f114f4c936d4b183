"""Performance we can prove without a GPU: every Triton kernel specialization a GPU can launch
compiles for Hopper (sm_90a), under the newest Triton and under Triton 3.6 (the lent GPU
machines'), and its compiled code passes the static gates:

- no register spills to local memory (outside SPILL_ALLOWLIST, below);
- wgmma (Hopper's warpgroup MMA) in every fp16/bf16 kernel whose dot tiles are big enough;
- shared memory within the per-block limit, and at least one CTA resident per SM.

`python -m fastnets kernels` runs in a subprocess (the compiled kernels, not the interpreter
this test session runs). Results are cached by kernel source hash, Triton version and target:
unchanged kernels are read from benchmarks/results/static-*.json (the committed report) or
FASTNETS_CACHE_DIR instead of being recompiled. test_cache_matches_a_fresh_compile keeps that
cache honest.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastnets import _config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

def _head_dim(row: dict) -> int:
    return max(row["constants"]["D"], row["constants"]["DV"])


# The only specializations allowed to spill: (kernel, dtype, predicate on the report row),
# each bounded, with the reason. Everything else, fp64 and IEEE fp32 included, runs tiles
# chosen (fastnets/kernels/attention.py _TILES, fastnets/kernels/conv.py) to fit in registers.
SPILL_ALLOWLIST: list = [
    # float64 attention exists for gradcheck (tiny inputs, speed irrelevant). Above head dim
    # 128 its dots keep 256-wide float64 rows of q / dO and the accumulators at two registers
    # a value: no tile, down to 16 x 16 on 4 warps, fits in 255 registers under both Tritons.
    ("_flash_attn_fwd_kernel", "fp64", lambda r: _head_dim(r) > 128 and r["spill_stores"] <= 1024),
    ("_flash_attn_bwd_dq_kernel", "fp64", lambda r: _head_dim(r) > 128 and r["spill_stores"] <= 4096),
    ("_flash_attn_bwd_dkdv_kernel", "fp64", lambda r: _head_dim(r) > 128 and r["spill_stores"] <= 16384),
    # IEEE float32 attention (TF32 off, torch's default matmul setting) runs its dots on FMA
    # units: the backward spills a few bytes in some masked / varlen variants even at the
    # smallest tile (16 x 16), dq above head dim 64 and dk/dv above 128; the forward does not.
    ("_flash_attn_bwd_dq_kernel", "fp32",
     lambda r: r["constants"].get("PREC") == "ieee" and _head_dim(r) > 64 and r["spill_stores"] <= 64),
    ("_flash_attn_bwd_dkdv_kernel", "fp32",
     lambda r: r["constants"].get("PREC") == "ieee" and _head_dim(r) > 128 and r["spill_stores"] <= 64),
    # float64 recurrent steps exist for gradcheck too: their dots run on FMA units with every
    # operand at two registers; at the smallest tiles (16 x 16 x 32) a few variants still
    # spill a few words, under Triton 3.6 more than 3.9.
    ("_rnn_step_fwd_kernel", "fp64", lambda r: r["spill_stores"] <= 64),
    ("_rnn_step_bwd_kernel", "fp64", lambda r: r["spill_stores"] <= 64),
]


def _spill_allowed(row: dict) -> bool:
    return any(row["kernel"] == k and row["dtype"] == d and pred(row) for k, d, pred in SPILL_ALLOWLIST)


def _report(tmp_dir: Path, extra_env: dict | None = None, args=()) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-m", "fastnets", "kernels", "--quiet", "--out", str(tmp_dir), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    (path,) = tmp_dir.glob("static-sm90a*.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def newest(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("static-newest"))


@pytest.fixture(scope="module")
def triton36(tmp_path_factory):
    path = _config.compat_triton_path()
    if not path:
        pytest.skip("no second Triton to check: FASTNETS_TRITON36_PATH is unset (scripts/env.sh installs Triton 3.6 "
                    "into .venv/triton36 and sets it, as CI does; a GPU machine's own Triton is the newest here)")
    return _report(tmp_path_factory.mktemp("static-triton36"), {"PYTHONPATH": path})


def _jit_kernels() -> set[str]:
    """Every @triton.jit function named *_kernel in fastnets/kernels/: what the launchers launch."""
    names = set()
    for path in (ROOT / "fastnets" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def _gate(report: dict) -> None:
    from fastnets.bench.static import gate_failures
    failures = gate_failures(report["specializations"], "sm_90a", _spill_allowed)
    assert not failures, f"{len(failures)} of {len(report['specializations'])} specializations fail the static " \
                         f"gates (Triton {report['environment']['triton']}):\n" + "\n".join(failures[:40])


def test_every_kernel_is_driven(newest):
    """A kernel the launch driver (fastnets/bench/launches.py) never reaches is never checked."""
    driven = {r["kernel"] for r in newest["specializations"]}
    missing = _jit_kernels() - driven
    assert not missing, f"kernels no launcher case reaches: {sorted(missing)}; add them to fastnets/bench/launches.py"


def test_static_gates_newest_triton(newest):
    assert newest["environment"]["arch"] == "sm_90a"
    assert len(newest["specializations"]) > 1000
    _gate(newest)


def test_static_gates_triton36(triton36):
    """The lent GPU machines run Triton 3.6: everything compiles there, within the same gates."""
    assert triton36["environment"]["triton"].startswith("3.6")
    _gate(triton36)


def test_wgmma_where_the_speed_bars_are(newest):
    """The convolutions and attention carry the speed bars: every 16-bit specialization of
    theirs that a benchmark shape reaches uses wgmma (ResNet convolutions: anything but
    depthwise; attention: head dims up to 128, whose tiles have 64-row multiples)."""
    def speed_bar(r):
        c = r["constants"]
        if r["kernel"].startswith("_conv2d_"):
            return c.get("Cg") != 1 and c.get("Kg") != 1
        if r["kernel"] in ("_flash_attn_fwd_kernel", "_flash_attn_bwd_dq_kernel", "_flash_attn_bwd_dkdv_kernel"):
            return max(c["D"], c["DV"]) <= 128
        return False
    rows = [r for r in newest["specializations"] if r["dtype"] in ("fp16", "bf16") and speed_bar(r)]
    assert len(rows) > 300
    other = [f"{r['kernel']} {r['constants']} ({r['case']}): {r['tensor_core']}" for r in rows
             if r["tensor_core"] != "wgmma"]
    assert not other, f"{len(other)} of {len(rows)} use no wgmma:\n" + "\n".join(other[:20])


def _assert_current(report: dict, name: str) -> None:
    with open(RESULTS / name) as f:
        committed = json.load(f)
    if committed["environment"]["triton"] != report["environment"]["triton"]:
        # Another Triton gives every specialization another identity: nothing to compare
        # (its gates still ran, from a full compile).
        pytest.skip(f"{name} is for Triton {committed['environment']['triton']}, "
                    f"this environment has {report['environment']['triton']}")
    have = {r["key"] for r in committed["specializations"]}
    stale = [r for r in report["specializations"] if r["key"] not in have]
    assert not stale, (f"{len(stale)} specializations are not in {name} (first: {stale[0]['kernel']} "
                       f"{stale[0]['case']}); run `python -m fastnets kernels` and commit benchmarks/results/static-*")


def test_committed_report_is_current(newest):
    """benchmarks/results/static-sm90a.json (the README's table) covers today's kernels: a
    kernel change without `python -m fastnets kernels` to refresh it fails here."""
    _assert_current(newest, "static-sm90a.json")


def test_committed_triton36_report_is_current(triton36):
    _assert_current(triton36, "static-sm90a-triton3.6.json")


def test_cache_matches_a_fresh_compile(newest, tmp_path):
    """Cached results (committed or local) are what the compiler says today: recompile one
    specialization of every kernel family without any cache and compare."""
    fresh = _report(tmp_path, {"FASTNETS_CACHE_DIR": str(tmp_path / "empty-cache")},
                    args=("--no-cache", "--sample"))
    by_key = {r["key"]: r for r in newest["specializations"]}
    assert fresh["specializations"]
    for r in fresh["specializations"]:
        cached = by_key[r["key"]]
        for field in ("registers", "spill_stores", "smem", "tensor_core"):
            assert r[field] == cached[field], f"{r['kernel']} {r['case']}: {field} {r[field]} fresh, {cached[field]} cached"
