"""`python -m fastnets bench`: every op family against its peers, written to
<out>/<device>.json, <out>/<family>.png and printed as a table. See harness.py."""
from __future__ import annotations

import json
import os
import sys

import torch


def run(ops=None, quick: bool = False, out: str | None = None, plots: bool = True) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Kernels can only run on a CPU under Triton's interpreter; it must be on before
        # fastnets.kernels is first imported (which the cases below do).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .cases import FAMILIES
    from .harness import environment, measure_ceilings, plot, run_case, speedups, table, device_slug

    out = out or os.path.join("benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    command = "python -m fastnets bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "fastnets.bench.run"
    env = environment(device, command, quick)
    if device.type == "cpu":
        print("FUNCTIONAL RUN on CPU: Triton kernels under the interpreter vs the torch reference on tiny sizes.\n"
              "These times check that every case runs end to end; they are not speed figures.\n")
    ceilings = measure_ceilings(device, quick)
    rows = []
    for family, make_cases in FAMILIES.items():
        for case in make_cases(device, quick):
            if ops and family not in ops and case.op not in ops and not any(case.op.startswith(o) for o in ops):
                continue
            print(f"  {case.op:<18} {case.label:<16} {str(case.dtype).replace('torch.', ''):<9}", flush=True)
            rows += run_case(case, device, quick, ceilings)
    if not rows:
        raise SystemExit(f"no benchmark case matches --ops {' '.join(ops or [])}; families: {', '.join(FAMILIES)}")
    speedups(rows, functional=device.type != "cuda")
    from .transformer_cases import published_ratios
    fa3 = published_ratios(rows)
    result = {"environment": env, "ceilings": ceilings, "results": rows}
    path = os.path.join(out, f"{device_slug(device)}.json")
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
    return result
