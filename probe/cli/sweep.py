"""``probe sweep``: prefill and decode cost over prompt lengths and batch sizes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import (
    CLIError,
    check_context,
    check_out,
    int_list,
    load_announced,
    missing,
    model_label,
    progress,
    resolve_device,
    resolve_dtype,
    resolve_model_arg,
)


def main(args) -> int:
    from ..routines.sweep import SWEEP_FILE, SWEEP_META, format_summary, sweep, sweep_summary

    prompt_lens = int_list(args.prompt_lens, "--prompt-lens")
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    for flag, v, low in (("--new-tokens", args.new_tokens, 1), ("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0)):
        if v < low:
            raise CLIError(f"{flag} must be >= {low}; got {v}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.out) if args.out else Path("probe-runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    note = check_out(out, "sweep", force=args.force)
    resolve_model_arg(args.model, args.preset)
    model, tok, model_id = load_announced(args, dtype, device, model_label(args))
    for p_len in prompt_lens:
        check_context(model, p_len, args.new_tokens)
    n = len(prompt_lens) * len(batch_sizes)
    progress(f"sweep: {n} configs x ({args.warmup} warm-up + {args.repeat} recorded) generate calls, "
              f"{args.new_tokens} new tokens each")
    if note and out.exists():  # --force: the old sweep goes before the new one's runs are written
        import shutil

        shutil.rmtree(out)
    try:
        df = sweep(model, tok, prompt_lens, batch_sizes, args.new_tokens, args.repeat, args.warmup, args.depth,
                   out=out, progress=True, model_id=model_id)
    except OSError as exc:
        from ..store.outdir import shown

        raise CLIError(f"cannot write the sweep to {shown(out)}: {exc.strerror or exc}; the configurations "
                       f"finished before the failure are saved under {shown(out / 'runs')}") from exc
    print(format_summary(sweep_summary(df)))
    for f in df.attrs.get("failures", []):
        print(f"failed: prompt {f['prompt_len']} x batch {f['batch']}: {f['error']}")
    print(f"\nsweep saved to {out}/ ({SWEEP_FILE}, {SWEEP_META}, runs/)")
    try:
        from probe.reports import write_sweep_reports

        for pth in write_sweep_reports(out, formats=("html",)):
            print(f"charts: {pth}")
    except ImportError as exc:
        print(f"probe: note: no charts written: {missing(exc)}", file=sys.stderr)
    if df.empty:
        raise CLIError("every sweep config failed; see the messages above")
    return 0
