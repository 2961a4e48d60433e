"""`probe sweep`: how prefill and decode cost grow with prompt length, context and batch.

For every (prompt length, batch size) pair: unrecorded warm-up generate calls, then ``repeat``
recorded ones with exactly ``new_tokens`` new tokens (EOS suppressed), each config's probe
run saved under ``OUT/runs/p{P}-b{B}/``. The result is one frame, one row per recorded step
(prefill and every decode step of every repeat), saved as ``OUT/sweep.parquet`` with
``OUT/sweep.json`` beside it; :func:`load_sweep` reads both back.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..store.files import MAX_META_BYTES, read_regular, replace_atomically
from ..store.folders import SWEEP_FILE, SWEEP_META
from .. import schema
from ..dtypes import dtype_name
from ..schema import BLOCK_ROLES, SWEEP, SWEEP_SUMMARY, Depth

log = logging.getLogger(__name__)

SWEEP_SCHEMA_VERSION = 1

#: sweep columns added after the first release: an older sweep.parquet loads with them null
_LATER = frozenset({"wait_pct"})


def _conform(df: pd.DataFrame, cols: dict[str, str]) -> pd.DataFrame:
    return schema.conform(df, cols, extra=False)


def empty_sweep() -> pd.DataFrame:
    """An empty sweep frame with every column at its dtype."""
    return _conform(pd.DataFrame(), SWEEP)


def _prompt_ids(prompt_len: int, batch: int, vocab: int, bos: int | None, seed: int, device: Any):
    """Deterministic token ids ``[batch, prompt_len]`` (BOS first when the model has one).

    Cost does not depend on which ids they are; random ids avoid tokenizer-specific lengths.
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + prompt_len)
    low = min(3, max(vocab - 1, 0))
    ids = torch.randint(low, vocab, (batch, prompt_len), generator=g)
    if bos is not None and 0 <= bos < vocab:
        ids[:, 0] = bos
    return ids.to(device)


def _model_device(model) -> Any:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else "cpu"


def sweep(model, tokenizer=None, prompt_lens: Sequence[int] = (16, 64, 256, 1024), batch_sizes: Sequence[int] = (1, 4),
          new_tokens: int = 32, repeat: int = 3, warmup: int = 1, depth: Depth = "blocks", *,
          out: str | os.PathLike | None = None, progress: bool = False, seed: int = 0,
          model_id: str | None = None) -> pd.DataFrame:
    """Profile ``generate()`` over prompt lengths and batch sizes.

    Args:
        model: a causal LM (any device).
        tokenizer: optional; gives the pad/BOS ids and bounds the ids used.
        prompt_lens, batch_sizes: the grid.
        new_tokens: new tokens per sequence (``min_new_tokens`` too, so every call runs
            exactly ``new_tokens`` steps).
        repeat: recorded calls per config; warmup: unrecorded calls before them.
        depth: probe depth for the recorded calls.
        out: folder to save ``sweep.parquet``, ``sweep.json`` and ``runs/p{P}-b{B}/``.
        progress: show a tqdm bar on stderr.
        seed: seed for the prompt ids.
        model_id: name stored in the runs.
    Returns:
        The sweep frame (:data:`SWEEP` columns), one row per recorded step. A config that
        fails (out of memory, too long for the model) is skipped and listed in
        ``frame.attrs["failures"]`` and in ``sweep.json``.
    """
    import torch

    from .profiling import profile
    from ..analysis.cost import annotate

    _check_grid(prompt_lens, batch_sizes, new_tokens, repeat, warmup)
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", None) or (len(tokenizer) if tokenizer is not None else 32000))
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else getattr(cfg, "bos_token_id", None)
    pad = None
    for src in (tokenizer, getattr(model, "generation_config", None), cfg):
        for key in ("pad_token_id", "eos_token_id"):
            v = getattr(src, key, None) if src is not None else None
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None and pad is None:
                pad = int(v)
    device = _model_device(model)
    root = Path(out) if out is not None else None
    configs = [(int(p), int(b)) for b in batch_sizes for p in prompt_lens]
    frames: list[pd.DataFrame] = []
    failures: list[dict] = []
    run_dirs: dict[str, str] = {}
    bar = _bar(len(configs) * (warmup + repeat), progress)
    try:
        for P, B in configs:
            bar.set_postfix_str(f"prompt {P} x batch {B}")
            ids = _prompt_ids(P, B, vocab, bos, seed, device)
            gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
            if pad is not None:
                gen["pad_token_id"] = pad
            try:
                # warm-up attached and cleared, as `probe run` does (profile's one meaning of warm-up)
                run = profile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, generate_kwargs=gen,
                              depth=depth, warmup=warmup, repeat=repeat, seed=seed, model_id=model_id,
                              progress=lambda _msg: bar.update(1))
            except Exception as exc:  # one config failing must not lose the others
                log.warning("sweep: prompt %d x batch %d failed: %s: %s", P, B, type(exc).__name__, exc)
                failures.append({"prompt_len": P, "batch": B, "error": f"{type(exc).__name__}: {exc}"})
                if device is not None and str(device).startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            rel = None
            if root is not None:
                rel = f"runs/p{P}-b{B}"
                run.meta["sweep"] = {"prompt_len": P, "batch": B}
                run.save(root / rel)
                run_dirs[f"p{P}-b{B}"] = rel
            frames.append(_config_frame(run, annotate(run.calls, model), P, B, rel))
    finally:
        bar.close()
    df = _conform(pd.concat(frames, ignore_index=True), SWEEP) if frames else empty_sweep()
    df.attrs["failures"] = failures
    if root is not None:
        meta = {
            "kind": "probe-sweep",
            "schema_version": SWEEP_SCHEMA_VERSION,
            "model_id": model_id or getattr(cfg, "name_or_path", None) or type(model).__name__,
            "model_class": type(model).__name__,
            "parameters": int(sum(t.numel() for t in model.parameters())),
            "weights_source": getattr(cfg, "probe_weights_source", None),
            "device": str(device),
            "dtype": dtype_name(next(iter(model.parameters())).dtype),
            "prompt_lens": [int(p) for p in prompt_lens],
            "batch_sizes": [int(b) for b in batch_sizes],
            "new_tokens": new_tokens,
            "repeat": repeat,
            "warmup": warmup,
            "depth": depth,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": run_dirs,
            "failures": failures,
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        }
        save_sweep(df, root, meta)
    return df


def _check_grid(prompt_lens, batch_sizes, new_tokens, repeat, warmup) -> None:
    if not prompt_lens or any(int(p) < 1 for p in prompt_lens):
        raise ValueError(f"prompt lengths must be >= 1; got {list(prompt_lens)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1; got {list(batch_sizes)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1; got {new_tokens}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1; got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep", unit="gen", file=sys.stderr, dynamic_ncols=True)


def _config_frame(run, calls: pd.DataFrame, P: int, B: int, rel: str | None) -> pd.DataFrame:
    """The steps of one config's generate calls, with repeat index, FLOPs and run metrics."""
    runs = run.runs[run.runs["kind"] == "generate"].reset_index(drop=True)
    order = {rid: i for i, rid in enumerate(runs["run_id"])}
    st = run.steps[run.steps["run_id"].isin(order)].copy()
    blocks = calls[calls["role"].isin(BLOCK_ROLES)]
    sums = blocks.groupby(["run_id", "step"], sort=False, observed=True)[["flops", "bytes_moved"]].sum(min_count=1)
    st = st.merge(sums.reset_index(), on=["run_id", "step"], how="left")
    per_run = runs[["run_id", "ttft_ms", "tpot_ms_mean", "prefill_tok_s", "decode_tok_s", "total_ms"]]
    st = st.merge(per_run, on="run_id", how="left")
    st["repeat"] = st["run_id"].map(order).astype("int64")
    st["prompt_len"] = P
    st["batch"] = B
    st["run_dir"] = rel
    st["wait_pct"] = run.noise().wait_pct
    return st


def save_sweep(df: pd.DataFrame, path: str | os.PathLike, meta: dict) -> Path:
    """Write ``sweep.parquet`` and ``sweep.json`` into ``path`` (created if needed)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    frame = _conform(df, SWEEP)
    replace_atomically(root / SWEEP_FILE, lambda tmp: frame.to_parquet(tmp, index=False))
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    replace_atomically(root / SWEEP_META, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return root


def load_sweep(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read a sweep folder back: ``(frame, meta)``, the frame equal to the one saved.

    Raises:
        ValueError: the folder holds no sweep, or its files are unreadable.
    """
    root = Path(path)
    f = root / SWEEP_FILE
    if not f.exists():
        raise ValueError(f"{root} holds no sweep ({SWEEP_FILE} missing); run `probe sweep --out {root}` first")
    try:  # regular files only: a FIFO by either name must not hang the reader
        df = pd.read_parquet(io.BytesIO(read_regular(f)))
        has_meta = (root / SWEEP_META).exists()
        meta = json.loads(read_regular(root / SWEEP_META, limit=MAX_META_BYTES).decode("utf-8")) if has_meta else {}
        if not isinstance(meta, dict):
            raise ValueError(f"{SWEEP_META} is not a JSON object")
    except Exception as exc:
        raise ValueError(f"cannot read the sweep in {root}: {exc}") from exc
    missing = [c for c in SWEEP if c not in df.columns and c not in _LATER]
    if missing:
        raise ValueError(f"{f} lacks columns {missing}: not a sweep frame of this version")
    out = _conform(df, SWEEP)
    out.attrs["failures"] = meta.get("failures", [])
    return out, meta


def sweep_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (prompt length, batch): medians over repeats of prefill and decode costs."""
    if df.empty:
        return _conform(pd.DataFrame(), SWEEP_SUMMARY)
    keys = ["prompt_len", "batch", "repeat"]
    pre = df[df["phase"] == "prefill"].groupby(keys)["latency_ms"].sum().rename("prefill_ms")
    dec = df[df["phase"] == "decode"].groupby(keys)["latency_ms"].mean().rename("decode_ms_per_token")
    run = df.groupby(keys)[["ttft_ms", "prefill_tok_s", "decode_tok_s", "wait_pct"]].first()
    per = pd.concat([pre, dec, run], axis=1).reset_index()
    g = per.groupby(["prompt_len", "batch"])
    out = g[["prefill_ms", "decode_ms_per_token", "ttft_ms", "prefill_tok_s", "decode_tok_s"]].median()
    for col in ("prefill_ms", "decode_ms_per_token"):
        out[f"{col}_min"] = g[col].min()
        out[f"{col}_max"] = g[col].max()
    out["wait_pct"] = g["wait_pct"].max()
    out["repeats"] = g.size()
    return _conform(out.reset_index(), SWEEP_SUMMARY)


# --------------------------------------------------------------------------- CLI
def format_summary(s: pd.DataFrame) -> str:
    """The sweep summary (:func:`sweep_summary`) as a text table: medians over the repeats with
    their min - max, and a warning naming the configs recorded while the machine was busy."""
    from ..recording.noise import BUSY_THRESHOLD_PCT

    lines = [f"{'prompt':>7}{'batch':>7}{'prefill ms [min - max]':>28}{'prefill tok/s':>15}"
             f"{'decode ms/tok [min - max]':>30}{'decode tok/s':>14}"]
    for _, r in s.iterrows():
        pre = f"{r['prefill_ms']:.2f} [{r['prefill_ms_min']:.2f} - {r['prefill_ms_max']:.2f}]"
        dec = f"{r['decode_ms_per_token']:.2f} [{r['decode_ms_per_token_min']:.2f} - {r['decode_ms_per_token_max']:.2f}]"
        lines.append(f"{int(r['prompt_len']):>7}{int(r['batch']):>7}{pre:>28}{r['prefill_tok_s']:>15,.0f}"
                     f"{dec:>30}{r['decode_tok_s']:>14,.1f}")
    if len(s):
        lines.append(f"(medians over {int(s['repeats'].max())} repeat(s), min - max in brackets)")
    busy = s[s["wait_pct"] > BUSY_THRESHOLD_PCT] if "wait_pct" in s else s.iloc[0:0]
    if len(busy):
        worst = float(busy["wait_pct"].max())
        names = ", ".join(f"p{int(r['prompt_len'])}-b{int(r['batch'])}" for _, r in busy.iterrows())
        lines.append(f"WARNING: the machine was busy: up to {worst:.0f} % of step time was spent waiting for a CPU "
                     f"({names}); rerun on a quiet machine or with more --repeat")
    return "\n".join(lines)
