"""One rank of a two-process tensor-parallel run on CPU, launched by tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODEL_DIR OUT

Each rank (gloo process group):

1. loads MODEL_DIR (a tiny Llama saved with ``save_pretrained``) with transformers' own
   tensor-parallel plan (``tp_plan="auto"``, passed as this transformers takes it:
   ``probe.compat.tensor_parallel_kwargs``), records a greedy generate at depth ``"all"``
   and saves its frames with ``probe.ranks.save_rank`` to ``OUT/hf``;
2. writes the tokens it generated to ``OUT/tokens/rank{r}.json``;
3. shards a two-linear ``nn.Sequential`` with torch's ``parallelize_module`` keeping DTensor
   outputs (``use_local_output=False``), records one forward and saves it to ``OUT/dtensor``;
4. records a forward under the wrong rank and checks that ``save_rank`` refuses it on every
   rank (no rank left waiting), writing the message to ``OUT/refused/rank{r}.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import probe
from probe.capture.ranks import save_rank

PROMPT = [5, 9, 17, 33, 2, 8, 40]


def _hf_tensor_parallel(model_dir: str, out: Path, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    from probe.compat import tensor_parallel_kwargs

    model = AutoModelForCausalLM.from_pretrained(model_dir, **tensor_parallel_kwargs("auto"))
    model.eval()
    ids = torch.tensor([PROMPT])
    with probe.attach(model, depth="all") as p:
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    save_rank(p, out / "hf")
    rank = dist.get_rank()
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    (out / "tokens" / f"rank{rank}.json").write_text(json.dumps(tokens[0].tolist()))


def _torch_dtensor(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    parallelize_module(
        model, mesh, {"0": ColwiseParallel(use_local_output=False), "1": RowwiseParallel(use_local_output=False)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.UnrecognisedModelWarning)
        p = probe.attach(model, depth="all")
    with p, torch.no_grad():
        y = model(torch.randn(3, 16))
        float(y.to_local().sum())  # use the output: waits on its all-reduce before the group goes away
    save_rank(p, out / "dtensor")


def _wrong_rank(out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = nn.Sequential(nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", probe.UnrecognisedModelWarning)
        p = probe.attach(model, rank=(rank + 1) % world)
    with p, torch.no_grad():
        model(torch.randn(1, 4))
    try:
        save_rank(p, out / "wrong")
    except ValueError as exc:
        (out / "refused").mkdir(parents=True, exist_ok=True)
        (out / "refused" / f"rank{rank}.txt").write_text(str(exc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--new-tokens", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        out = Path(args.out)
        _hf_tensor_parallel(args.model_dir, out, args.new_tokens)
        _torch_dtensor(out)
        _wrong_rank(out)
    finally:
        dist.destroy_process_group()
    # Everything is written. End here, before C++ static destructors run: on transformers 4.57
    # a process that loaded a model with tp_plan="auto" aborts at interpreter teardown about one
    # run in three ("terminate called without an active exception", SIGABRT), with or without
    # the probe attached; transformers 5 does not. The test reads the files, not the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
