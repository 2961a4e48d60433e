"""What each clock reads for the ops of one step, against torch.profiler in a forward without the probe.

Why the deep pass does not time its ops by PyTorch's ``RecordFunction`` clock. Under a Python
dispatch mode each op leaves three nested profiler events: ``aten::mm`` (the model's call,
through the Python key) > ``PythonDispatchMode`` > ``aten::mm`` (the mode's own call below the
Python key: dispatcher and kernel, no Python). The inner event looks like the op as
torch.profiler times it in a plain forward. It is not: the op itself runs slower with the mode's
Python between every two ops (its code and data are colder), and a view reads low (likely its
own work at the ``ADInplaceOrView`` key, above the Python key and outside the inner event). Per op kind on one step
(model and step as in ``deep_pass.py``), each op the least of ``--repeats`` interleaved generate
calls, less each instrument's own cost of the events nested inside it:

- ``profiler``: torch.profiler's time (outermost events of the kinds, their totals) in a forward
  without the probe: the reference of ``deep_pass.py`` item 2;
- ``profiler again``: the same, a second time (the A/A control: how close two runs of one
  instrument come);
- ``legacy``: the legacy ``RecordFunction`` profiler (``torch.autograd.profiler_legacy``: silent
  and thread-local, what a deep step could run beside its mode) on the same plain forward;
- ``mode``: the inner event under a dispatch mode that only calls the op, by torch.profiler's clock;
- ``mode+legacy``: the same by the legacy profiler;
- ``deep``: the deep pass's ``host_ms`` as recorded (now torch.profiler's on the step's twin, a
  step without the mode: ``probe/recording/deep_twin.py``; the tables in docs/deep.md's "Why not
  PyTorch's own op clock" were taken before, with the mode's calibrated clock);
- ``legacy s-1`` (a decode step after the first): the legacy profiler on the step before, in a
  plain forward: what a deep run could time beside a sampled decode step (the same ops, the
  cache one token shorter).

    python benchmarks/deep_clock.py [--step 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deep_pass import deep_step, event_cost_ns, kind_of, least_per_op, loop_event_ns, profiler_step  # noqa: E402
from probe.models.bundled import load_bundled  # noqa: E402

DISPATCH_EVENT = "PythonDispatchMode"


class CallOnly(TorchDispatchMode):
    """A dispatch mode that calls each op as the deep pass does (its C++ operator) and nothing else."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func._op(*args, **(kwargs or {}))


def _legacy_config():
    from torch.autograd.profiler_legacy import profile

    return profile(record_shapes=False, profile_memory=False).config()


class StepHook:
    """Runs ``begin()`` before and ``end()`` after forward ``index`` of a generate call."""

    def __init__(self, model, index: int, begin, end) -> None:
        self.index, self.n, self.begin, self.end, self.got = index, 0, begin, end, None
        self.handles = [model.register_forward_pre_hook(self.pre), model.register_forward_hook(self.post)]

    def pre(self, _m, _a):
        if self.n == self.index:
            self.state = self.begin()

    def post(self, _m, _a, _o):
        if self.n == self.index:
            self.got = self.end(self.state)
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def run_step(model, ids, index: int, begin, end):
    hook = StepHook(model, index, begin, end)
    try:
        model.generate(ids, max_new_tokens=index + 1, min_new_tokens=index + 1, do_sample=False)
    finally:
        hook.remove()
    return hook.got


def legacy_records(thread: list, kinds: set[str] | None) -> list[tuple[str, float, int]]:
    """From one thread's raw legacy records: (name, us, events nested inside) of the outermost
    events of ``kinds``, or (``kinds`` None) of each dispatch's inner event (the first child of a
    ``PythonDispatchMode`` event named as its parent)."""
    out: list[tuple[str, float, int]] = []
    stack: list[list] = []  # [name, push record, counted, nested events, inner seen (dispatch events)]
    for rec in thread:
        kind = rec.kind()
        if kind == "push":
            name = rec.name()
            for e in stack:
                e[3] += e[2]
            if kinds is not None:
                counted = name in kinds and not any(e[2] for e in stack)
            else:
                top = stack[-1] if stack else None
                counted = (top is not None and top[0] == DISPATCH_EVENT and not top[4] and len(stack) > 1
                           and stack[-2][0] == name)
                if counted:
                    top[4] = True
            stack.append([name, rec, counted, 0, False])
        elif kind == "pop":
            e = stack.pop()
            if e[2]:
                out.append((e[0], e[1].cpu_elapsed_us(rec), e[3]))
    return out


def legacy_step(model, ids, index: int, kinds: set[str] | None, mode: bool = False):
    def begin():
        m = None
        if mode:
            m = CallOnly()
            m.__enter__()
        torch.autograd._enable_profiler_legacy(_legacy_config())
        return m

    def end(m):
        records = torch.autograd._disable_profiler_legacy()
        if m is not None:
            m.__exit__(None, None, None)
        return legacy_records(max(records, key=len), kinds)

    return run_step(model, ids, index, begin, end)


def mode_step(model, ids, index: int):
    """The inner events of a do-nothing dispatch mode's ops, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    def begin():
        m = CallOnly()
        m.__enter__()
        p = profile(activities=[ProfilerActivity.CPU])
        p.__enter__()
        return m, p

    def end(state):
        m, p = state
        p.__exit__(None, None, None)
        m.__exit__(None, None, None)
        return p

    prof = run_step(model, ids, index, begin, end)

    def size(e) -> int:
        return sum(1 + size(c) for c in e.cpu_children)

    out = []
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if e.name == DISPATCH_EVENT and e.cpu_parent is not None:
            inner = next((c for c in sorted(e.cpu_children, key=lambda c: c.time_range.start)
                          if c.name == e.cpu_parent.name), None)
            if inner is not None:
                out.append((inner.name, inner.cpu_time_total, size(inner)))
    return out


def legacy_event_ns(rounds: int = 9, n: int = 500) -> float:
    """The legacy profiler's own cost per event, measured as ``deep_pass.event_cost_ns`` measures
    torch.profiler's (a loop of ``aten::t``, profiled against unprofiled)."""
    def profiled(loop, n: int) -> tuple[float, float]:
        torch.autograd._enable_profiler_legacy(_legacy_config())
        per_call = loop()
        records = torch.autograd._disable_profiler_legacy()
        return per_call, sum(1 for r in max(records, key=len) if r.kind() == "push") / n

    return loop_event_ns(profiled, rounds, n)


def per_kind(events: list[tuple], event_ns: float) -> pd.DataFrame:
    """(name, us, nested) per op -> per kind: ms less the instrument's own cost of nested events, calls."""
    df = pd.DataFrame(events, columns=["name", "us", "nested"])
    df["ms"] = (df["us"] - df["nested"] * event_ns / 1e3) / 1e3
    return df.groupby("name").agg(ms=("ms", "sum"), calls=("ms", "size"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=0, help="the step compared (0: prefill)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_bundled()
    ids = tok("The quick brown fox jumps over the lazy dog, and then", return_tensors="pt")["input_ids"]
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm
    index = args.step
    deep_ops = deep_step(model, ids, index + 1, index)[0]
    kinds = {kind_of(op) for op, _ in deep_ops}
    names = ("profiler", "profiler again", "legacy", "mode", "mode+legacy", "deep") + (("legacy s-1",) if index >= 2 else ())
    got: dict[str, list] = {k: [] for k in names}
    for _ in range(args.repeats):  # interleaved, each op the least of the repeats
        got["profiler"].append(profiler_step(model, ids, index + 1, index, full=False, kinds=kinds)[0])
        got["legacy"].append(legacy_step(model, ids, index, kinds))
        got["profiler again"].append(profiler_step(model, ids, index + 1, index, full=False, kinds=kinds)[0])
        got["mode"].append(mode_step(model, ids, index))
        got["mode+legacy"].append(legacy_step(model, ids, index, None, mode=True))
        ops = deep_step(model, ids, index + 1, index)[0]
        got["deep"].append([(kind_of(op), ms * 1e3, 0) for op, ms in ops])
        if index >= 2:
            got["legacy s-1"].append(legacy_step(model, ids, index - 1, kinds))
    kineto_ns, legacy_ns = event_cost_ns(), legacy_event_ns()
    own = {"profiler": kineto_ns, "profiler again": kineto_ns, "legacy": legacy_ns, "mode": kineto_ns, "mode+legacy": legacy_ns, "deep": 0.0,
           "legacy s-1": legacy_ns}
    table = {}
    for name, reps in got.items():
        least, same = least_per_op(reps)
        if not same:
            print(f"  ({name}: the repeats did not see the same ops: the first repeat's times)")
        table[name] = per_kind(least, own[name])
    ref = table["profiler"]
    total = float(ref["ms"].sum())
    print(f"step {index}: per op kind, ms (less each instrument's own cost of nested events: torch.profiler "
          f"{kineto_ns:.0f} ns, legacy {legacy_ns:.0f} ns an event) and ratio to torch.profiler in a plain forward")
    cols = [c for c in table if c != "profiler"]
    print(f"  {'op':<52} {'profiler':>9} " + " ".join(f"{c:>14}" for c in cols))
    within = {c: [0, 0] for c in cols}
    for kind, row in ref.sort_values("ms", ascending=False).iterrows():
        if not (row["ms"] >= 0.01 * total or row["ms"] >= 0.05):
            continue
        cells = []
        for c in cols:
            t = table[c]
            r = float(t.loc[kind, "ms"]) / row["ms"] if kind in t.index and row["ms"] > 0 else float("nan")
            within[c][1] += 1
            within[c][0] += abs(r - 1) <= 0.10
            cells.append(f"{r:14.2f}")
        print(f"  {kind:<52} {row['ms']:9.3f} " + " ".join(cells))
    print("  within 10 %: " + ", ".join(f"{c} {k} of {n}" for c, (k, n) in within.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
