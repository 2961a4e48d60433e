"""HTML report size and build time for runs of 1k, 10k and 100k call rows.

The large runs are real recordings stretched in time: a tiny 32-layer LLaMA generates a few
dozen tokens under the probe, then its decode steps are repeated with shifted step numbers,
KV lengths and start times until the calls frame has the wanted number of rows. The report
must stay within 6 MB at 100k rows (it embeds aggregates, never raw rows).

    python benchmarks/report_size.py [--rows 1000,10000,100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

LIMIT_BYTES = 6_000_000  # 6 MB, decimal


def record_tiny(layers: int = 32, new_tokens: int = 24, prompt: int = 16, seed: int = 0):
    """A real probe recording of a tiny random LLaMA (``layers`` decoder layers) on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import probe

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 512, (1, prompt))
    with probe.attach(model, model_id=f"tiny-llama-{layers}L") as p:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       min_new_tokens=new_tokens)
    return p.run


def stretch(run, n_calls: int):
    """``run`` with its decode steps repeated until ``calls`` has about ``n_calls`` rows.

    Copy ``k`` of the decode steps is shifted by ``k`` times the decode span in step, KV length
    and start time, so the result looks like one long generate call.
    """
    from probe import schema
    from probe.analysis.run import Run

    calls, steps = run.calls, run.steps
    dec_c = calls[calls["phase"] == "decode"]
    dec_s = steps[steps["phase"] == "decode"]
    rest_c = calls[calls["phase"] != "decode"]
    rest_s = steps[steps["phase"] != "decode"]
    per_copy = max(len(dec_c), 1)
    copies = max(1, -(-(n_calls - len(rest_c)) // per_copy))
    n_dec = len(dec_s)
    span = float(dec_s["start_ms"].max() + dec_s["latency_ms"].iloc[-1] - dec_s["start_ms"].min())

    def tile(df: pd.DataFrame, kv: bool) -> pd.DataFrame:
        k = np.repeat(np.arange(copies), len(df))
        out = pd.concat([df] * copies, ignore_index=True)
        out["step"] = out["step"].to_numpy() + k * n_dec
        out["start_ms"] = out["start_ms"].to_numpy() + k * span
        if kv:
            out["kv_len"] = out["kv_len"].to_numpy() + k * n_dec
        return out

    new_c = pd.concat([rest_c, tile(dec_c, True)], ignore_index=True).head(n_calls)
    new_s = pd.concat([rest_s, tile(dec_s, True)], ignore_index=True)
    new_s = new_s[new_s["step"] <= new_c["step"].max()]
    runs = run.runs.copy()
    runs["steps"] = len(new_s)
    runs["new_tokens"] = len(new_s)
    return Run(calls=schema.conform(new_c, schema.CALLS), steps=schema.conform(new_s, schema.STEPS),
               runs=schema.conform(runs, schema.RUNS), meta=dict(run.meta))


def main() -> None:
    from probe.reports.html import write_html

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000,10000,100000")
    ap.add_argument("--out", default=None, help="keep the reports in this folder")
    args = ap.parse_args()
    base = record_tiny()
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="probe-report-size-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"base recording: {len(base.calls)} calls, {len(base.steps)} steps")
    print(f"{'call rows':>10} {'steps':>7} {'HTML MB':>9} {'build s':>8}  within 6 MB")
    for n in (int(v) for v in args.rows.split(",")):
        run = stretch(base, n)
        t0 = time.perf_counter()
        path = write_html(run, out_dir / f"report-{n}.html")
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"{len(run.calls):>10,} {len(run.steps):>7,} {size / 1e6:>9.3f} {dt:>8.2f}  "
              f"{'yes' if size <= LIMIT_BYTES else 'NO'}")


if __name__ == "__main__":
    main()
