"""Process CPU time of `probe report` beyond reading the run: ``probe.load(run)`` vs writing its report.

A small real recording (the tiny 32-layer LLaMA of ``report_size.py``, a few dozen tokens) is
saved twice: as this probe saves it (its modules' cost coefficients in ``meta["module_costs"]``)
and as an older probe saved it (config only: the cost view then builds a meta-device model,
importing transformers). Each is read and reported in fresh processes, as `probe report` is,
alternating the two; each process prints the CPU time (``time.process_time``) of
``probe.load`` and of ``reports.write_reports`` (HTML + CSV), and whether torch or
transformers got imported. The script prints every process and the medians side by side; the
target is a report that costs at most 2 s of CPU beyond reading the run.

    PYTHONPATH=. python3 benchmarks/report_cost.py [--rounds 3] [--layers 32] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
t0 = time.process_time()
import probe
run = probe.load(sys.argv[1])
t1 = time.process_time()
from probe.reports import write_reports
write_reports(run, sys.argv[1], formats=("html", "csv"), out=sys.argv[2])
t2 = time.process_time()
print(t1 - t0, t2 - t1, "transformers" in sys.modules, "torch" in sys.modules)
"""


def measure(run_dir: Path, out: Path) -> tuple[float, float, bool, bool]:
    """(load CPU s, report CPU s, transformers imported, torch imported) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(out)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    load, report, tf, th = res.stdout.split()[-4:]
    return float(load), float(report), tf == "True", th == "True"


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from report_size import record_tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (interleaved)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    run = record_tiny(layers=args.layers, new_tokens=args.new_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="probe-report-cost-"))
    new = run.save(tmp / "recorded-facts")
    old = run.save(tmp / "config-only")
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("module_costs", None)
    meta.pop("manifest", None)  # meta.json is edited: as a run saved before manifests
    (old / "meta.json").write_text(json.dumps(meta))
    print(f"run: {len(run.calls)} calls, {len(run.steps)} steps, {args.layers} layers ({tmp})")
    print(f"{'variant':<16} {'load CPU s':>10} {'load+report CPU s':>17} {'difference':>10}  imports")
    rows: dict[str, list[tuple[float, float]]] = {"recorded-facts": [], "config-only": []}
    for i in range(args.rounds):
        for name, d in (("recorded-facts", new), ("config-only", old)):
            load, report, tf, th = measure(d, tmp / f"out-{name}-{i}")
            rows[name].append((load, report))
            imports = ", ".join(m for m, on in (("torch", th), ("transformers", tf)) if on) or "neither torch nor transformers"
            print(f"{name:<16} {load:>10.2f} {load + report:>17.2f} {report:>10.2f}  {imports}")
    print("medians:")
    for name, vals in rows.items():
        load = statistics.median(v[0] for v in vals)
        report = statistics.median(v[1] for v in vals)
        total = statistics.median(v[0] + v[1] for v in vals)
        print(f"{name:<16} {load:>10.2f} {total:>17.2f} {report:>10.2f}  "
              f"{'within' if report <= 2.0 else 'OVER'} 2 s beyond reading the run")
    a = statistics.median(v[1] for v in rows["config-only"])
    b = statistics.median(v[1] for v in rows["recorded-facts"])
    print(f"report CPU saved by the recorded facts: {a - b:.2f} s ({a:.2f} -> {b:.2f})")


if __name__ == "__main__":
    main()
