"""``probe compare``: two saved runs side by side, with significance and an optional gate."""

from __future__ import annotations

import json
from pathlib import Path

from probe.reports.terminal import compare_lines, noise_lines, op_compare_lines, significance_lines

from ..store.files import write_text
from ..columns import ranked
from .common import CLIError, check_out, load_run, missing


def main(args) -> int:
    from ..analysis.comparison import comparability, differences, fact, gate, gate_verdict, significance

    pct = args.fail_above
    if pct is not None and not (pct >= 0 and pct == pct and pct != float("inf")):
        raise CLIError(f"--fail-above takes a percentage >= 0, e.g. 5; got {pct}")
    a = load_run(args.run_a)
    b = load_run(args.run_b)
    problems = comparability(a, b)
    if problems and pct is not None:
        raise CLIError(f"{args.run_a} and {args.run_b} are not comparable: {'; '.join(problems)}. "
                       "Gate a change by recording both runs with the same model, --depth, prompt and batch size")
    try:
        from probe.reports.compare import write_comparison
    except ImportError as exc:
        raise CLIError(f"cannot write the report: {missing(exc)}") from exc
    from probe.reports.compare import comparison_frame

    sig = significance(a, b, levels=("block", "role", "module"))  # the gate names the module that regressed
    out = Path(args.out) if args.out else Path(f"compare-{Path(args.run_a).name}-vs-{Path(args.run_b).name}")
    check_out(out, "compare")
    from ..store.outdir import shown

    try:
        paths = write_comparison(a, b, out, sig=sig)
    except OSError as exc:
        raise CLIError(f"cannot write the comparison to {shown(out)}: {exc.strerror or exc}; choose another --out") from exc
    for pth in paths:
        print(shown(pth))
    for line in differences(a, b):
        print(f"note: {line}")
    same_depth = fact(a, "depth") == fact(b, "depth")
    print("")
    print("\n".join(compare_lines(comparison_frame(a, b), roles=same_depth)))
    print("\n".join(significance_lines(sig)))
    if not (a.ops.empty or b.ops.empty):
        from probe.reports.compare import op_comparison_frame

        print("\n".join(op_compare_lines(op_comparison_frame(a, b))))
    elif not (a.ops.empty and b.ops.empty):
        print(f"\nonly {'A' if b.ops.empty else 'B'} has a deep pass: record both with --deep to compare them op by op")
    for label, run in ((" (A)", a), (" (B)", b)):
        for line in noise_lines(run, label):
            if line:
                print(line)
    if pct is None:
        return 0
    decision = gate_verdict(sig, pct)
    gate_json = out / "gate.json"
    write_text(gate_json, json.dumps(decision, indent=2) + "\n")
    print(shown(gate_json))
    failed = gate(sig, pct)
    judged = f"{decision['judged']} rows judged: headline figures, and every module, role and block with >= 1% of its phase"
    if failed.empty:
        print(f"\nOK: nothing is slower than A by more than {pct:g}% with significance ({judged})")
        return 0
    print(f"\nFAIL: B is slower than A by more than {pct:g}% (95% interval above 0, rank test p < 0.05 after "
          f"Holm's correction for the {judged}):")
    order = {"metric": 0, "module": 1, "role": 2, "block": 3}
    failed = failed.assign(_o=ranked(failed["level"], order)).sort_values(["_o", "slowdown_pct"], ascending=[True, False])
    for _, row in failed.iterrows():
        where = ", ".join(x for x in (str(row["phase"]), "" if row["level"] == "metric" else str(row["level"])) if x)
        print(f"  {row['name']}{f' ({where})' if where else ''}: {row['slowdown_pct']:+.1f}% "
              f"[{row['ci_low_pct']:+.1f}%, {row['ci_high_pct']:+.1f}%], p = {row['p_holm']:.2g}")
    return 1
