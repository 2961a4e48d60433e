"""Memory per in-memory call record, and the time to build frames from 1,000,000 records.

Records are produced by the real hooks: a 4-layer LLaMA (hidden 32) recorded at depth
"all" generates until the probe holds at least N call records. The probe's record memory is
measured with tracemalloc (allocations made by the probe's own files while recording, which
excludes the model's tensors), then the frames are built and timed.

Targets: at most 100 bytes per record; building the frames from 1,000,000 records in at
most 2 s.

    python benchmarks/record_memory.py [--records 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import probe  # noqa: E402


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model()
    ids = torch.arange(3, 11).unsqueeze(0)
    p = probe.attach(model, depth="all")
    probe_dir = str(Path(probe.__file__).parent)
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    t0 = time.perf_counter()
    runs = 0
    try:
        while len(p._c_t0) < args.records:
            model.generate(ids, max_new_tokens=500, do_sample=False)
            runs += 1
    finally:
        p.detach()
    record_s = time.perf_counter() - t0
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    n = len(p._c_t0)
    flt = [tracemalloc.Filter(True, probe_dir + "/*")]
    diff = snap1.filter_traces(flt).compare_to(snap0.filter_traces(flt), "filename")
    traced = sum(d.size_diff for d in diff)
    # tracemalloc sees the column buffers too (array.array allocates through Python's
    # allocator), so `traced` is the whole in-memory record; the columns are shown apart.
    cols = [p._c_t0, p._c_t1, p._c_sig, p._c_ev, p._c_mem0, p._c_mem1, p._c_peak]
    array_bytes = sum(c.buffer_info()[1] * c.itemsize for c in cols)
    per_record = max(traced, 0) / n

    t1 = time.perf_counter()
    run = p.run
    build_s = time.perf_counter() - t1
    print(f"record_memory: {n:,} call records from {runs} generate calls ({len(run.steps):,} steps) "
          f"recorded in {record_s:.1f}s at depth 'all'")
    print(f"  column data            {array_bytes / n:6.1f} bytes/record ({array_bytes / 2**20:.1f} MiB)")
    print(f"  everything the probe allocated while recording (tracemalloc: columns with growth slack, "
          f"steps, runs, signatures)")
    print(f"  total                  {per_record:6.1f} bytes/record (target <= 100): {'PASS' if per_record <= 100 else 'FAIL'}")
    print(f"  frame build            {build_s:6.2f} s for {len(run.calls):,} rows (target <= 2 s): "
          f"{'PASS' if build_s <= 2 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
