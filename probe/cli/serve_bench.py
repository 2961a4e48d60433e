"""``probe serve-bench``: continuous batching under Poisson arrivals, recorded as a run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from probe.reports.terminal import serve_summary

from .common import (
    CLIError,
    check_context,
    check_out,
    default_model,
    int_list,
    load_announced,
    missing,
    progress,
    require,
    resolve_device,
    resolve_dtype,
    saved_files,
)


def main(args) -> int:
    from ..compat import continuous_batching_gap
    from ..routines.profiling import ProfileError, profile_serving

    gap = continuous_batching_gap()
    if gap is not None:
        raise CLIError(f"serve-bench needs continuous batching the probe can read: {gap}")
    lens = int_list(args.prompt_lens, "--prompt-lens")
    checks = (
        ("--requests", args.requests, args.requests >= 1, ">= 1"),
        ("--rate", args.rate, args.rate > 0, "> 0 (or inf)"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--max-batch-tokens", args.max_batch_tokens, args.max_batch_tokens >= 1, ">= 1"),
        ("--page-size", args.page_size, args.page_size >= 1, ">= 1"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 0, ">= 0"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
        ("--temperature", args.temperature, args.temperature is None or args.temperature > 0, "> 0"),
    )
    require(checks)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else Path("probe-runs") / f"serve-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out(out_dir, "run", force=args.force)

    from transformers import GenerationConfig

    from ..routines.loadgen import cache_config, plan

    model, tok, model_id = load_announced(args, dtype, device, args.model or args.preset or default_model())
    check_context(model, max(lens), args.max_new_tokens)
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or len(tok))
    work = plan(args.requests, args.rate, lens, args.max_new_tokens, vocab, seed=args.seed)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample), "eos_token_id": -1}
    for key in ("top_k", "top_p", "temperature"):
        v = getattr(args, key)
        if v is not None:
            gen[key] = v
    gen["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else 0
    cb = cache_config(work, page_size=args.page_size, max_batch_tokens=args.max_batch_tokens)
    span = work.arrivals_s[-1]
    progress(f"serving {args.requests} requests over {span:.1f}s (Poisson, {args.rate:g}/s), prompts of "
              f"{','.join(map(str, sorted(set(lens))))} tokens, {args.max_new_tokens} new tokens each ...")
    done = [0]

    def tick(_out) -> None:
        done[0] += 1
        if done[0] % max(1, args.requests // 4) == 0 or done[0] == args.requests:
            progress(f"  {done[0]}/{args.requests} requests done, {time.perf_counter() - t0:.1f}s")

    failure = None
    t0 = time.perf_counter()
    try:
        run = profile_serving(model, work, GenerationConfig(**gen), cb, depth=args.depth, seed=args.seed,
                              model_id=model_id, on_result=tick, cuda_graphs=args.cuda_graphs)
    except ProfileError as exc:
        run, failure = exc.run, exc.__cause__
    run.meta["serve_bench"]["eos"] = "ignored: every request generates max_new_tokens"
    run.meta["command"] = "probe " + " ".join(sys.argv[1:]) if sys.argv else "probe serve-bench"
    from ..store.outdir import save_run, shown

    saved, save_error = save_run(run, out_dir)
    print(serve_summary(run))
    if save_error is not None:
        raise CLIError(save_error)
    print(f"\nrun saved to {shown(saved)}/ ({saved_files(saved)})")
    if not args.no_report:
        try:
            from probe.reports import write_reports

            for pth in write_reports(run, saved, formats=("html", "csv")):
                print(f"report: {pth}")
        except ImportError as exc:
            print(f"probe: note: no report written: {missing(exc)}", file=sys.stderr)
    if failure is not None:
        raise CLIError(f"serving failed: {type(failure).__name__}: {failure} (partial run saved to {saved})")
    return 0
