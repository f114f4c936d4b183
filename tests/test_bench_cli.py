"""`python -m fastnets bench --quick` runs end to end here and writes its results, and the
results file carries what ARCHITECTURE.md asks (device, versions, commit, command, timings
with median and spread)."""
import json
import subprocess
import sys

import torch


def test_bench_quick_runs_and_writes_results(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastnets", "bench", "--quick", "--ops", "layer_norm", "bias_act_swiglu",
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    name = "cpu-functional" if not torch.cuda.is_available() else None
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and (name is None or files[0].stem == name)
    result = json.loads(files[0].read_text())
    env = result["environment"]
    assert {"device", "torch", "triton", "git_commit", "command"} <= set(env)
    rows = result["results"]
    assert {r["op"] for r in rows} == {"layer_norm", "bias_act_swiglu"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd_bwd"}
    assert all(r["error"] is None and r["ms_median"] > 0 and r["ms_p20"] <= r["ms_p80"] for r in rows)
    assert (tmp_path / "norm.png").exists() and (tmp_path / "activation.png").exists()
    if not torch.cuda.is_available():
        assert "FUNCTIONAL RUN" in out.stdout
