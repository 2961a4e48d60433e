"""What the commands share: errors, progress on stderr, the model and prompt from the options,
the ``--out`` check. Printing is the CLI's job; the library never prints.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import deps
from ..models.loading import MODEL_ENV, ModelLoadError, random_weights
from ..models.loading import default_model as _default_model

DEFAULT_PROMPT = "我喜欢攀岩"
#: seconds between progress lines; unset: 0.5 in a terminal, 10 when piped (a log stays short)
PROGRESS_ENV = "PROBE_PROGRESS_S"
#: the most a --prompt-file may hold (a pipe or /dev/zero is read up to this, then refused)
MAX_PROMPT_BYTES = 10 << 20

__all__ = ["CLIError", "DEFAULT_PROMPT", "MODEL_ENV", "PROGRESS_ENV", "random_weights"]


class CLIError(Exception):
    """A fatal, user-facing error: printed without a traceback, exit status 2."""


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith(("cuda", "mps", "xpu")):
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N")
    return name


def resolve_dtype(name: str, device: str):
    from ..models import resolve_dtype

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return resolve_dtype(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file:
        raise CLIError("give either --prompt or --prompt-file, not both")
    if args.prompt_file:
        try:
            if args.prompt_file == "-":
                raw = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
            else:
                with open(args.prompt_file, "rb") as fh:  # a pipe such as <(cmd) too: read, never stat'ed
                    raw = fh.read(MAX_PROMPT_BYTES + 1)
        except OSError as exc:
            raise CLIError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror or exc}") from exc
        if len(raw) > MAX_PROMPT_BYTES:
            raise CLIError(f"--prompt-file {args.prompt_file} holds more than {MAX_PROMPT_BYTES >> 20} MB; a prompt "
                           "file is read up to that size: give a shorter prompt")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            print(f"probe: warning: {args.prompt_file} is not valid UTF-8 (byte {exc.start}); "
                  "undecodable bytes were replaced with U+FFFD", file=sys.stderr)
            return raw.decode("utf-8", errors="replace")
    return DEFAULT_PROMPT if args.prompt is None else args.prompt


def refuse_empty_prompt(prompt: str, source: str) -> None:
    if not prompt.strip():
        raise CLIError(f"{source} is empty{' (only whitespace)' if prompt else ''}: the model would see only the "
                       "BOS token; give some text, e.g. --prompt \"我喜欢攀岩\"")


def default_model() -> str:
    """What MODEL means when it is not given: $PROBE_MODEL, else smollm2-135m if installed, else tiny."""
    return _default_model()


def resolve_model_arg(model: str | None, preset: str | None = None) -> str | Path | None:
    """The folder (a Path) or known name (a str) MODEL stands for; None with --preset."""
    from ..models.loading import resolve

    if model and preset:
        raise CLIError("give either MODEL or --preset, not both")
    try:
        return resolve(model, preset)
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from exc


def load_model(model: str | None, preset: str | None, dtype, device: str, *, seed: int = 0,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               rebuild_model_cache: bool = False, verify_model_cache: bool = False):
    """(model, tokenizer, model_id) through :func:`probe.loading.load`, its errors as CLI errors."""
    from .. import models
    from ..models.loading import load

    try:
        return tuple(load(model, preset=preset, dtype=dtype, device=device, seed=seed,
                          attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                          rebuild_cache=rebuild_model_cache, verify_cache=verify_model_cache, progress=progress))
    except (ModelLoadError, models.ModelNotInstalledError) as exc:
        raise CLIError(str(exc)) from exc


def validate_generation_options(args) -> None:
    """Reject bad generation options before a model is loaded."""
    checks = (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--warmup", args.warmup, args.warmup >= 0, ">= 0"),
        ("--repeat", args.repeat, args.repeat >= 1, ">= 1"),
        ("--num-beams", args.num_beams, args.num_beams is None or args.num_beams >= 1, ">= 1"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 0, ">= 0"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
        ("--temperature", args.temperature, args.temperature is None or args.temperature > 0, "> 0"),
    )
    require(checks)


def require(checks) -> None:
    """``(flag, value, ok, rule)`` rows: the first that is not ok is a CLIError that says the rule."""
    for flag, value, ok, rule in checks:
        if not ok:
            raise CLIError(f"{flag} must be {rule}; got {value}")


def load_announced(args, dtype, device: str, label: str):
    """:func:`load_model` from the command's options, saying on stderr what loads and how long it took."""
    t = time.perf_counter()
    progress(f"loading {label} ({dtype}, {device}) ...")
    loaded = load_model(args.model, args.preset, dtype, device, seed=getattr(args, "seed", 0),
                        attn_implementation=getattr(args, "attn_implementation", None),
                        trust_remote_code=getattr(args, "trust_remote_code", False),
                        rebuild_model_cache=args.rebuild_model_cache,
                        verify_model_cache=getattr(args, "verify_model_cache", False))
    model = loaded[0]
    progress(f"loaded in {time.perf_counter() - t:.1f}s: {type(model).__name__}, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters")
    return loaded


def check_context(model, prompt_tokens: int, new_tokens: int) -> None:
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise CLIError(
            f"the prompt is {prompt_tokens} tokens and --max-new-tokens is {new_tokens}, but the model's "
            f"context is {limit} positions; shorten the prompt or lower --max-new-tokens"
        )


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def encode(tok, prompt: str, batch: int, device: str, *, chat_template: bool = False):
    """The prompt as ``input_ids`` / ``attention_mask`` repeated ``batch`` times.

    With ``chat_template`` (and a tokenizer that has one) the prompt is one user message
    followed by the assistant's turn, as a chat model expects it.
    """
    if batch < 1:
        raise CLIError(f"--batch-size must be >= 1; got {batch}")
    if chat_template and has_chat_template(tok):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        # the same prompt repeated: no padding needed
        enc = {k: enc[k].repeat(batch, 1) for k in ("input_ids", "attention_mask") if k in enc}
    else:
        # the same prompt repeated: no padding needed (and many tokenizers have no pad token)
        enc = tok([prompt] * batch, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.shape[-1] == 0:
        raise CLIError("the prompt encodes to zero tokens and the tokenizer adds no BOS; give a non-empty --prompt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def model_label(args) -> str:
    if args.preset:
        return f"preset {args.preset}"
    return args.model or f"{default_model()} (default)"


def check_out(out: Path, kind: str, *, force: bool = False, is_file: bool = False) -> str | None:
    """Check an ``--out`` before any work (see :mod:`probe.store.outdir`); print and return its note, if any."""
    from ..store.outdir import OutError, check_out

    try:
        note = check_out(out, kind, force=force, is_file=is_file)
    except OutError as exc:
        raise CLIError(str(exc)) from exc
    if note:
        progress(note)
    return note


def saved_files(folder: Path | None = None) -> str:
    """The files a saved run folder holds (``folder``'s, where given), as the terminal lists them."""
    from ..analysis.run import FILES, META

    return ", ".join([n for n in FILES.values() if folder is None or (folder / n).exists()] + [META])


def missing(exc: ImportError) -> str:
    """An import error with the command that installs what is missing."""
    fix = deps.hint(exc)
    return f"{exc}; install it: {fix}" if fix and fix not in str(exc) else str(exc)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress_interval(tty: bool) -> float:
    try:
        value = float(os.environ.get(PROGRESS_ENV, ""))
    except ValueError:
        value = float("nan")
    return value if value > 0 else (0.5 if tty else 10.0)


class Progress:
    """Decode progress on stderr from a background thread that reads the probe's step count.

    A thread, not a generate() streamer: a streamer copies every token to the host, which
    would change the very timings being measured (and beam search refuses streamers).
    """

    def __init__(self, p, total: int) -> None:
        import threading

        self.p, self.total = p, total
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.stop = threading.Event()
        self.shown = False
        self.thread = threading.Thread(target=self._loop, name="probe-progress", daemon=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def _loop(self) -> None:
        interval = progress_interval(self.tty)
        while not self.stop.wait(interval):
            steps = self.p.generate_steps
            if steps is None:  # not started yet, or over: nothing new to say
                continue
            msg = f"generating: step {steps}/{self.total}, {time.perf_counter() - self.t0:.1f}s"
            self.shown = True
            print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty and self.shown:
            print(file=sys.stderr)


def load_run(path: str, columns=None):
    from .. import RunLoadError, load

    try:
        return load(path, columns=columns)
    except RunLoadError as exc:
        raise CLIError(str(exc)) from exc


def int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated integers, e.g. 16,64,256; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise CLIError(f"{flag} needs integers >= 1; got {text!r}")
    return vals
