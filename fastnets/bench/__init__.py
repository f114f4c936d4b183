"""`python -m fastnets bench`: every op family against its peers, written to
<out>/<device>.json, <out>/<family>.png and printed as a table. See harness.py."""
from __future__ import annotations

import json
import os
import sys

import torch


def run(ops=None, quick: bool = False, out: str | None = None, plots: bool = True, merge: bool = False) -> dict:
    """Run the cases of the families / ops asked for; write <out>/<device>.json and .md and
    the plots. merge: keep the rows of other families already in <out>/<device>.json (a GPU
    run in parts). Raises SystemExit(1) after writing everything when a fastnets
    implementation raised or failed its correctness check on any case."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Kernels can only run on a CPU under Triton's interpreter; it must be on before
        # fastnets.kernels is first imported (which the cases below do).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .cases import FAMILIES
    from .harness import (CaseFailure, device_slug, environment, measure_ceilings, plot, run_case, speedups,
                          table)

    out = out or os.path.join("benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    command = "python -m fastnets bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "fastnets.bench.run"
    env = environment(device, command, quick)
    if device.type == "cpu":
        print("FUNCTIONAL RUN on CPU: Triton kernels under the interpreter vs the torch reference on tiny sizes.\n"
              "These times check that every case runs end to end; they are not speed figures.\n")
    ceilings = measure_ceilings(device, quick)
    rows, failures, families = [], [], set()
    for family, make_cases in FAMILIES.items():
        for case in make_cases(device, quick):
            if ops and family not in ops and case.op not in ops and not any(case.op.startswith(o) for o in ops):
                continue
            families.add(family)
            print(f"  {case.op:<18} {case.label:<16} {str(case.dtype).replace('torch.', ''):<9}", flush=True)
            try:
                rows += run_case(case, device, quick, ceilings)
            except CaseFailure as exc:
                message, case_rows = exc.args
                print(f"  FAILED {message}", flush=True)
                failures.append(message)
                rows += case_rows
    if not rows:
        raise SystemExit(f"no benchmark case matches --ops {' '.join(ops or [])}; families: {', '.join(FAMILIES)}")
    speedups(rows, functional=device.type != "cuda")
    from .transformer_cases import published_ratios
    fa3 = published_ratios(rows, env["device"])
    path = os.path.join(out, f"{device_slug(device)}.json")
    parts = {}
    if merge and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        kept = [r for r in previous.get("results", []) if r["family"] not in families]
        parts = previous.get("parts", {})
        rows = kept + rows
    for family in families:
        parts[family] = {"git_commit": env["git_commit"], "date": env["date"], "ceilings": ceilings,
                         "failures": [f for f in failures]}
    result = {"environment": env, "ceilings": ceilings, "parts": parts, "failures": failures, "results": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    text = table(rows, ceilings)
    with open(os.path.join(out, f"{device_slug(device)}.md"), "w") as f:
        f.write(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit'][:10]}\n\n"
                + text + "\n")
    images = plot(rows, ceilings, out, f"{env['device']} (torch {env['torch']}, triton {env['triton']})") if plots else []
    print("\n" + text)
    if fa3:
        print("\nattention forward vs published FlashAttention-3 (H100 SXM5, bf16, d=128, not causal):\n"
              + "\n".join(fa3))
    print(f"\nwrote {path}" + "".join(f", {p}" for p in images))
    if failures:
        print(f"\n{len(failures)} benchmark cases FAILED (fastnets raised or disagreed with torch):\n  "
              + "\n  ".join(failures))
        raise SystemExit(1)
    return result
