"""``probe shapes``: the shape walk of a full-size architecture on the meta device."""

from __future__ import annotations

from pathlib import Path

from .common import CLIError, has_chat_template, progress, refuse_empty_prompt, resolve_model_arg


def main(args) -> int:
    from .. import models
    from ..routines.shapes import format_walkthrough, walkthrough

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.model and not args.preset:  # a preset name works as MODEL; a folder or a model name wins
        try:
            models.resolve_model(args.model)
        except ValueError:
            if models.find_preset(args.model):
                args.model, args.preset = None, args.model
    try:
        target = resolve_model_arg(args.model, args.preset)
    except CLIError as exc:
        if args.preset:
            raise
        raise CLIError(f"{exc}; or a preset (architecture only): {', '.join(models.preset_names())}") from exc
    folder = None
    if args.preset:
        target, title = args.preset, args.preset
    elif isinstance(target, Path):
        if not (target / "config.json").exists():
            raise CLIError(f"{target} has no config.json: pass a Hugging Face model folder or --preset NAME")
        folder = str(target)
        target, title = folder, folder
    elif target == "tiny":
        title = f"the bundled model ({models.BUNDLED_ID})"
    else:  # a trained model known by name: its config and tokenizer from the converted folder
        spec = models.KNOWN_MODELS[target]
        try:
            folder = str(models.converted_dir(spec, rebuild=args.rebuild_model_cache,
                                                 verify=args.verify_model_cache, progress=progress))
        except models.ModelNotInstalledError as exc:
            raise CLIError(str(exc)) from exc
        target, title = folder, spec.model_id
    n, where = _count_prompt_tokens(args, folder)
    try:
        df = walkthrough(target, n, batch=args.batch_size, depth=args.depth, dtype=args.dtype)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(f"prompt      {args.prompt!r} -> {n} tokens (counted by {where})")
    if args.preset or target == "tiny":  # a built-in architecture: say where its numbers come from
        print(_preset_line(args.preset or "tiny"))
    print(format_walkthrough(df, title))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        print(f"\ntable written to {out}")
    return 0


def _count_prompt_tokens(args, folder: str | None) -> tuple[int, str]:
    """Tokens for the walkthrough and a note on where the count came from."""
    if args.prompt_tokens is not None:
        if args.prompt_tokens < 1:
            raise CLIError(f"--prompt-tokens must be >= 1; got {args.prompt_tokens}")
        return int(args.prompt_tokens), "--prompt-tokens"
    refuse_empty_prompt(args.prompt, "--prompt")
    tok = None
    if folder:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception:  # a folder with only config.json: fall back to the bundled tokenizer
            tok = None
    where = "the model's tokenizer"
    if tok is None:
        from ..models import load_tokenizer

        tok = load_tokenizer()
        where = "the bundled tokenizer (the real model's tokenizer may count differently)"
    if not args.no_chat_template and has_chat_template(tok):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in 5.x, a list before
        where += ", in its chat template"
    else:
        ids = tok(args.prompt)["input_ids"]
    n = len(ids)
    if n < 1:
        raise CLIError("the prompt encodes to zero tokens; give a non-empty --prompt or --prompt-tokens N")
    return n, where


def _preset_line(name: str) -> str:
    """Where a preset's numbers come from, with its vocabulary (the lm_head width)."""
    from ..models import preset_config, preset_source

    cfg = preset_config(name)
    return (f"preset      {name}: vocabulary {cfg.vocab_size:,}, hidden {cfg.hidden_size:,}, "
            f"{cfg.num_hidden_layers} layers; from {preset_source(name)}")
