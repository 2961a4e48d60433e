"""Each role's share of the forward, the probe against plain wrappers run without it, per phase.

What a careful user would write by hand, run without the probe: a ``perf_counter_ns`` wrapper of
every module the probe records at the depth (self time by a stack: a call's time minus its
recorded children's), of the attention function at sublayers (the registry entry or the
modeling module's ``eager_attention_forward``, as the probe records it), and of the model's
forward (the step). Probe runs and plain runs alternate in adjacent pairs (the order flips each
pair); for each pair and role, the ratio of the role's share of the forward (the probe's
forward without its own ``(probe)`` row) to the plain wrappers' share. A machine that is slower
for one run of a pair moves every role's milliseconds alike and no share: the share ratio is what
tells whether the instrument moves time from one part to another.

The plain wrappers' own cost is taken out of their figures the way the probe takes out its own
(``plain_cost``: inside the window, and outside it in the caller's self time, measured on an
identity module; ``--raw-plain`` leaves it in). Probe runs take a warm-up generate under the
same attachment first, as ``probe run`` does (``--cold``: the first generate after attaching,
where every module's first call of each shape interns a signature).

Target: every role with more than 1 % of the phase's forward within 5 % relative, or within
2 µs per call, in prefill and in decode, at depth blocks and sublayers, on the bundled model and
on SmolLM2-135M (when installed). Judged on a quiet machine; the run's busy-machine figure is
printed beside the table (the probe's own noise detector of the last probe run).

    python benchmarks/role_shares.py [--pairs 15] [--new-tokens 16] [--models bundled,smollm2]
                                     [--depths blocks,sublayers]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import probe  # noqa: E402
from probe.recording import attnfn, noise  # noqa: E402
from probe.recording.discovery import select_modules  # noqa: E402

PROMPT = "The KV cache turns every later step of generation into a one-token forward, so"


class PlainWrappers:
    """Plain perf_counter wrappers of the modules recorded at ``depth`` (and of the attention
    function at sublayers and all): self time per (phase, role), the forward per phase.

    Each wrapper does the least a stopwatch can: two clock reads around the call and one list
    append of ``(role, start, end, keyword count)``; nesting, self times and phases are worked
    out afterwards from the intervals. Its own cost then stays close to what it costs in a
    tight loop: measured inside a real decoder layer's call (an outer stopwatch around the
    wrapper), a wrapper that kept a stack and two dicts per call cost 3.0 µs against 1.2 µs in
    a loop, so ~1.9 µs a call its calibration could not take out; this one 1.4 µs against
    0.8 µs."""

    def __init__(self, model, depth: str, cost: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0),
                 in_situ: bool = True) -> None:
        self.model, self.depth = model, depth
        # the wrapper's own cost per call, ns: inside its window and outside it (in the caller's),
        # each as a + b * (keyword arguments): packing and unpacking them is the wrapper's too;
        # and of the outside part, what its record (the append after the window) cost in the
        # calibration's loop. With ``in_situ`` each call's record is read in place instead (a
        # third clock read after the append, as the probe's C wrapper reads its own record):
        # between two layers' work it costs more than in a loop, where its memory stays warm
        self.cost = cost
        self.in_situ = in_situ
        self.mods = [(info.role, mod) for mod, info in select_modules(model, depth)]
        self.log: list[tuple[str, int, int, int]] = []
        self.tail: list[int] = []  # per call, the clock read after its record was appended
        self.saved: list = []

    def _timed(self, fn, role: str):
        import functools

        clock, append, tail = time.perf_counter_ns, self.log.append, self.tail.append

        if not self.in_situ:
            @functools.wraps(fn)  # generate reads the forward's signature (logits_to_keep): keep it
            def wrapped(*a, **k):
                t0 = clock()
                out = fn(*a, **k)
                append((role, t0, clock(), len(k)))
                return out

            return wrapped

        @functools.wraps(fn)
        def wrapped_in_situ(*a, **k):
            t0 = clock()
            out = fn(*a, **k)
            append((role, t0, clock(), len(k)))
            tail(clock())
            return out

        return wrapped_in_situ

    def __enter__(self):
        for role, mod in self.mods:
            mod.__dict__["forward"] = self._timed(mod.forward, role)
        if self.depth != "blocks":
            self._wrap_attention_functions()
        # the step's own self time is the residue
        self.model.__dict__["forward"] = self._timed(self.model.forward, ROOT)
        return self

    def _wrap_attention_functions(self) -> None:
        """Where the probe records the attention function: every registry entry, and the
        ``eager_attention_forward`` of each recorded module's modeling module."""
        mu = sys.modules["transformers.modeling_utils"]
        targets = [(space, key) for space in (getattr(mu.AttentionInterface, "_global_mapping", {}),
                                              getattr(mu.ALL_ATTENTION_FUNCTIONS, "_local_mapping", {}))
                   for key in list(space)]
        for name in {type(m).__module__ for _, m in self.mods}:
            if callable(getattr(sys.modules.get(name), "eager_attention_forward", None)):
                targets.append((sys.modules[name].__dict__, "eager_attention_forward"))
        for space, key in targets:
            fn = space[key]
            if callable(fn):
                self.saved.append((space, key, fn))
                space[key] = self._timed(fn, attnfn.ROLE)

    def __exit__(self, *exc):
        for _, mod in self.mods:
            del mod.__dict__["forward"]
        del self.model.__dict__["forward"]
        for space, key, fn in reversed(self.saved):
            space[key] = fn

    def reset(self) -> None:
        self.log.clear()
        self.tail.clear()

    def record_ns(self) -> list[int]:
        """Per call, what its record (the append after its window) took, as read in place."""
        return [t2 - e[2] for e, t2 in zip(self.log, self.tail)]

    def self_times(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(phase, role) -> (self ns, calls) from the intervals: a call's window less its own
        cost inside it, less each child's window and that child's wrapper cost outside it. The
        first root forward is prefill, every later one decode."""
        i0, i1, o0, o1, post = self.cost
        rec = self.record_ns() if self.in_situ else [post] * len(self.log)
        order = sorted(range(len(self.log)), key=lambda j: (self.log[j][1], -self.log[j][2]))
        own = [0.0] * len(self.log)
        phase_of = [""] * len(self.log)
        stack: list[int] = []
        roots = 0
        for j in order:
            role, t0, t1, nkw = self.log[j]
            while stack and self.log[stack[-1]][2] <= t0:
                stack.pop()
            if role == ROOT and not stack:
                phase_of[j] = "prefill" if roots == 0 else "decode"
                roots += 1
            else:
                phase_of[j] = phase_of[stack[-1]] if stack else "decode"
            own[j] += (t1 - t0) - (i0 + i1 * nkw)
            if stack:
                own[stack[-1]] -= (t1 - t0) + (o0 - post) + o1 * nkw + rec[j]
            stack.append(j)
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for j, (role, *_rest) in enumerate(self.log):
            key = (phase_of[j], "residue" if role == ROOT else role)
            ns, n = out.get(key, (0, 0))
            out[key] = (ns + own[j], n + 1)
        return out

    def figures(self) -> dict[str, dict[str, tuple[float, int]]]:
        """phase -> role -> (ms, calls), with 'forward' the phase's forward ms."""
        out: dict[str, dict[str, tuple[float, int]]] = {}
        for (phase, role), (ns, calls) in self.self_times().items():
            out.setdefault(phase, {})[role] = (ns * 1e-6, calls)
        for phase, roles in out.items():
            roles["forward"] = (sum(ms for ms, _ in roles.values()), roles["residue"][1])
        return out


ROOT = "(forward)"


def plain_cost(rounds: int = 7, n: int = 3000) -> tuple[float, float, float, float, float]:
    """The plain wrapper's own cost per call (ns), the way the probe calibrates its own: inside
    its window (what a call's time reads beyond the forward's) and outside it (what the caller's
    self time holds for each wrapped call), least over interleaved rounds, on an identity
    function called with no keyword argument and with eight (a decoder layer's call has about
    that many): ``(inside, inside per keyword, outside, outside per keyword, record)``, the
    last the 10th percentile of what the record after the window took per call in the loop
    (the probe's ``post_ns``)."""

    def ident(x, **kw):
        return x

    with warnings.catch_warnings():  # an identity module has no decoder layers: nothing to select
        warnings.simplefilter("ignore")
        pw = PlainWrappers(torch.nn.Identity(), "blocks")
    wrapped = pw._timed(ident, "x")
    x = torch.zeros(4)
    got = {}
    records: list[int] = []
    for nkw in (0, 8):
        kw = {f"k{i}": None for i in range(nkw)}
        inside, total = [], []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                ident(x, **kw)
            bare = time.perf_counter_ns() - t0
            pw.reset()
            t0 = time.perf_counter_ns()
            for _ in range(n):
                wrapped(x, **kw)
            t = time.perf_counter_ns() - t0
            windows = sum(e[2] - e[1] for e in pw.log)
            records.extend(pw.record_ns())
            inside.append((windows - bare) / n)  # the windows' sum beyond the bare calls
            total.append((t - bare) / n)
        i, c = max(0.0, min(inside)), max(0.0, min(total))
        got[nkw] = (i, max(0.0, c - i))
    (i0, o0), (i8, o8) = got[0], got[8]
    post = min(float(sorted(records)[len(records) // 10]), o0) if records else 0.0
    return i0, max(0.0, (i8 - i0) / 8), o0, max(0.0, (o8 - o0) / 8), post


def cost_in_situ(model, ids, new_tokens: int = 8) -> float:
    """The plain wrapper's whole own cost per decoder-layer call as it runs inside a real
    forward (ns, median): an outer stopwatch around each wrapped layer, less the wrapper's
    window; beside :func:`plain_cost`'s tight-loop figure it shows what calibration cannot take
    out (a cold wrapper between two layers' work costs more than a warm one in a loop)."""
    import functools

    layers = [mod for role, mod in PlainWrappers(model, "blocks").mods if role == "layer"]
    pw = PlainWrappers(model, "blocks")
    outer: list[int] = []

    def around(fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter_ns()
            out = fn(*a, **k)
            outer.append(time.perf_counter_ns() - t0)
            return out
        return timed

    for mod in layers:
        mod.__dict__["forward"] = around(pw._timed(mod.forward, "layer"))
    try:
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for mod in layers:
            del mod.__dict__["forward"]
    return statistics.median(o - (t1 - t0) for o, (_, t0, t1, _) in zip(outer, pw.log))


def probe_figures(run) -> tuple[dict[str, dict[str, tuple[float, int]]], dict[str, float]]:
    """The probe's role self times per phase (instrument cost out), its forward without the
    (probe) row, and that row's ms per phase."""
    s = run.summary("role")
    steps = run.steps
    out: dict[str, dict[str, tuple[float, int]]] = {}
    probe_ms: dict[str, float] = {}
    for phase in ("prefill", "decode"):
        rows = s[s["phase"] == phase]
        if rows.empty:
            continue
        fwd = float(steps.loc[(steps["phase"] == phase) & steps["blocks_ms"].notna(), "forward_ms"].sum())
        roles = {}
        for _, r in rows.iterrows():
            if r["role"] == "probe":
                probe_ms[phase] = float(r["self_ms"])
            else:
                roles[r["role"]] = (float(r["self_ms"]), int(r["calls"]))
        roles["forward"] = (fwd - probe_ms.get(phase, 0.0), int((steps["phase"] == phase).sum()))
        out[phase] = roles
    return out, probe_ms


def measure(model, ids, depth: str, pairs: int, new_tokens: int, cost: tuple[float, ...], cold: bool,
            in_situ: bool = True) -> dict:
    for _ in range(2):  # warm both paths
        with PlainWrappers(model, depth):
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        with probe.attach(model, depth=depth):
            model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    ratios: dict[tuple[str, str], list[float]] = {}
    per_call_us: dict[tuple[str, str], list[float]] = {}
    shares: dict[tuple[str, str], list[float]] = {}
    probe_rows: dict[str, list[float]] = {}
    busy: list[float] = []
    for i in range(pairs):
        got = {}
        for kind in (("probe", "plain") if i % 2 == 0 else ("plain", "probe")):
            if kind == "plain":
                with PlainWrappers(model, depth, cost, in_situ) as pw:
                    if not cold:
                        model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                        pw.reset()
                    model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                got["plain"] = pw.figures()
            else:
                with probe.attach(model, depth=depth) as p:
                    if not cold:  # as `probe run` does: a warm-up generate under the same attachment
                        model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                        p.clear()
                    model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                run = p.run
                got["probe"], pr = probe_figures(run)
                for ph, v in pr.items():
                    probe_rows.setdefault(ph, []).append(v / max(got["probe"][ph]["forward"][0], 1e-9))
                b = noise.busy(run.steps, run.runs, run.meta)
                if b.wait_pct == b.wait_pct:
                    busy.append(b.wait_pct)
        for phase, roles in got["plain"].items():
            pfwd = got["probe"][phase]["forward"][0]
            afwd = roles["forward"][0]
            for role, (a_ms, calls) in roles.items():
                if role == "forward" or role not in got["probe"][phase]:
                    continue
                b_ms = got["probe"][phase][role][0]
                key = (phase, role)
                shares.setdefault(key, []).append(a_ms / afwd)
                ratios.setdefault(key, []).append((b_ms / pfwd) / (a_ms / afwd) if a_ms > 0 else float("nan"))
                # the share difference as microseconds per call of the role, on the plain forward
                per_call_us.setdefault(key, []).append((b_ms / pfwd - a_ms / afwd) * afwd * 1e3 / max(calls, 1))
    med = statistics.median
    return {"share": {k: med(v) for k, v in shares.items()}, "ratio": {k: med(v) for k, v in ratios.items()},
            "us_per_call": {k: med(v) for k, v in per_call_us.items()},
            "probe_share": {k: med(v) for k, v in probe_rows.items()}, "busy_pct": busy}


def load(name: str):
    from probe.models import load_bundled, load_smollm2

    model, tok = load_bundled() if name == "bundled" else load_smollm2()
    model.eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"] if tok is not None else torch.arange(3, 10).unsqueeze(0)
    return model, ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--models", default="bundled,smollm2")
    ap.add_argument("--depths", default="blocks,sublayers")
    ap.add_argument("--cold", action="store_true",
                    help="measure the first generate after attaching (no warm-up under the same attachment)")
    ap.add_argument("--raw-plain", action="store_true",
                    help="leave the plain wrappers' own cost in their figures (it lands in each caller's self time)")
    ap.add_argument("--calibrated-plain", action="store_true",
                    help="take the plain wrappers' record cost from the calibration loop, not read in place")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.new_tokens < 2:
        ap.error("--pairs must be at least 1 and --new-tokens at least 2 (a decode step)")
    torch.set_num_threads(1)
    cost = (0.0,) * 5 if args.raw_plain else plain_cost()
    print(f"plain wrapper's own cost per call, taken out of its figures: {cost[0]:.0f} + {cost[1]:.0f} ns per keyword "
          f"argument inside its window, {cost[2]:.0f} + {cost[3]:.0f} ns per keyword outside it (in the caller's self time)"
          + ("" if not args.raw_plain else " (--raw-plain: left in)")
          + ("" if args.raw_plain or args.calibrated_plain else
             f"; of that, its record after the window ({cost[4]:.0f} ns in the loop) read in place on every call, "
             "as the probe reads its own"))
    print("probe runs: " + ("the first generate after attaching (--cold)" if args.cold
                            else "after a warm-up generate under the same attachment, as `probe run` does"))
    ok = True
    for name in args.models.split(","):
        try:
            model, ids = load(name)
        except Exception as exc:  # SmolLM2 not installed: say so, go on
            print(f"\n{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        with torch.inference_mode():
            situ = cost_in_situ(model, ids)
        print(f"\n{name}: the plain wrapper's own cost inside a decoder layer's call {situ:.0f} ns "
              f"(calibrated in a loop: {cost[0] + cost[2] + 8 * (cost[1] + cost[3]):.0f} ns with eight keywords)")
        for depth in args.depths.split(","):
            with torch.inference_mode():
                res = measure(model, ids, depth, args.pairs, args.new_tokens, cost, args.cold,
                              in_situ=not (args.raw_plain or args.calibrated_plain))
            busy = res["busy_pct"]
            print(f"\n{name}, depth {depth}: prompt {ids.shape[-1]} tokens, {args.new_tokens} new, one thread, "
                  f"medians of {args.pairs} adjacent pairs; busy-machine figure of the probe runs: "
                  + (f"median {statistics.median(busy):.1f} %, max {max(busy):.1f} %" if busy else "not measured"))
            print(f"{'phase':<9}{'role':<16}{'plain share':>12}{'share ratio':>13}{'us/call':>9}  verdict")
            for phase in ("prefill", "decode"):
                for (ph, role), share in sorted(res["share"].items(), key=lambda kv: -kv[1]):
                    if ph != phase:
                        continue
                    r, us = res["ratio"][(ph, role)], res["us_per_call"][(ph, role)]
                    judged = share > 0.01
                    good = abs(r - 1) <= 0.05 or abs(us) <= 2.0
                    ok &= good or not judged
                    verdict = ("ok" if good else "OFF") if judged else "(under 1 %)"
                    print(f"{phase:<9}{role:<16}{share:>12.2%}{r:>13.3f}{us:>9.2f}  {verdict}")
                ps = res["probe_share"].get(phase)
                if ps is not None:
                    print(f"{phase:<9}{'(probe)':<16}{'':>12}{'':>13}{'':>9}  {ps:.3%} of the probe's forward")
        del model
    print("\nall roles over 1 % within 5 % (or 2 µs per call):", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
