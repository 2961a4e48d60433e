"""Observers as plug-ins: one defined here, attached with ``probe.attach(model, observers=[...])``,
keeps its own records, adds its declared columns to the frames and runs its hooks outside the
windows the recorder times — with no change anywhere else."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import probe
from probe import schema
from probe.recording.observer import Contribution, Observer
from tiny import VirtualClock, tiny_llama


def _ids(n: int = 5) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


class StepCounter(Observer):
    """Counts the steps of each run; fills a steps column, a runs column and a meta entry."""

    columns = {"steps": {"counted": "Int64"}, "runs": {"counted_steps": "Int64"}}

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}  # run id -> the step indices it was told of

    def step_end(self, step, kwargs, out, error) -> None:
        self.seen.setdefault(step.run.run_id, []).append(step.index)

    def clear(self) -> None:
        self.seen = {}

    def records(self) -> dict:
        return {rid: list(v) for rid, v in self.seen.items()}

    @classmethod
    def frames(cls, records, *, calls, steps, runs, rank) -> Contribution:
        rows = [(rid, i, n + 1) for rid, idx in records.items() for n, i in enumerate(idx)]
        return Contribution(
            steps=pd.DataFrame(rows, columns=["run_id", "step", "counted"]),
            runs=pd.DataFrame({"run_id": list(records), "counted_steps": [len(v) for v in records.values()]}),
            meta={"step_counter": sum(len(v) for v in records.values())},
        )


def test_an_extra_observer_adds_its_columns_and_the_public_frames_keep_theirs():
    model = tiny_llama(layers=2)
    counter = StepCounter()
    with probe.attach(model, observers=[counter]) as p:
        model(_ids(4))  # a plain forward: a run of kind "forward"
        model.generate(_ids(), max_new_tokens=4, do_sample=False)
    run = p.run
    steps, runs = run.steps, run.runs
    # the schema's columns first, at their dtypes, then the plug-in's
    assert list(steps.columns) == [*schema.STEPS, "counted"] and list(runs.columns) == [*schema.RUNS, "counted_steps"]
    assert {c: str(t) for c, t in steps.dtypes.items() if c in schema.STEPS} == schema.STEPS
    assert str(steps["counted"].dtype) == "Int64" and str(runs["counted_steps"].dtype) == "Int64"
    for rid, g in steps.groupby("run_id", sort=False):
        assert g["counted"].tolist() == list(range(1, len(g) + 1))
    assert runs.set_index("run_id")["counted_steps"].to_dict() == steps.groupby("run_id").size().to_dict()
    assert run.meta["step_counter"] == len(steps) == 1 + 4
    # the default observers still do their part beside it
    assert len(run.sampling) and run.runs.loc[run.runs["kind"] == "generate", "process_cpu_ms"].notna().all()
    p.clear()
    assert counter.seen == {} and p.run.steps.empty


def test_an_observers_hooks_run_outside_the_timed_windows():
    """Step hooks before the step's clock starts and after it stops: on an injected clock, 20 ms
    spent in each lands in no forward_ms. A run's window opens where a stopwatch around generate
    would, so the run's begin hook is inside total_ms, stated apart as probe_start_ms; so is its
    closing hook (probe_end_ms, and the last step's sampling stage "probe"); its end hook runs
    after the window closed."""
    clock = VirtualClock()
    reads: list[tuple[str, int]] = []  # (hook, the clock when it was called)
    windows: list[tuple[int, int]] = []  # each step's (t0, t1), as its end hook saw them

    class Slow(Observer):
        def run_begin(self, run) -> None:
            clock.spend(20_000_000)

        def run_closing(self, run) -> None:
            clock.spend(30_000_000)

        def run_end(self, run) -> None:
            clock.spend(20_000_000)

        def step_begin(self, step) -> None:
            reads.append(("begin", clock.t))
            clock.spend(20_000_000)

        def step_end(self, step, kwargs, out, error) -> None:
            reads.append(("end", clock.t))
            windows.append((step.t0, step.t1))
            clock.spend(20_000_000)

    model = tiny_llama(layers=2)
    with probe.attach(model, clock=clock, observers=[Slow()]) as p:
        model.generate(_ids(), max_new_tokens=4, do_sample=False)
    steps, runs = p.run.steps, p.run.runs
    assert [k for k, _ in reads] == ["begin", "end"] * 4
    for (_, begin), (_, end), (t0, t1) in zip(reads[::2], reads[1::2], windows):
        assert begin + 20_000_000 < t0 < t1 <= end  # started after the begin hook, stopped before the end hook
    assert (steps["forward_ms"] < 1.0).all()  # a few hundred clock ticks, not 20 ms
    # the time between forwards (the probe's own, on this clock) holds both hooks' 40 ms
    assert (steps["outside_ms"].iloc[:-1] >= 40.0).all()
    gen = runs[runs["kind"] == "generate"].iloc[0]
    assert gen["probe_start_ms"] == pytest.approx(20.0, abs=0.01)  # the begin hook, in the run and stated
    assert gen["probe_end_ms"] == pytest.approx(30.0, abs=0.01)  # the closing hook, in the run and stated
    # 3 gaps x 40 ms, the first step's begin hook, the last one's end hook, the run's begin and
    # closing hooks: the run's end hook is outside
    assert 210.0 < gen["total_ms"] < 211.0
    # the closing is the last step's: its outside_ms, as the probe's own stage, the stages adding up
    last = steps["step"].max()
    assert steps.set_index("step").loc[last, "outside_ms"] >= 50.0
    samp = p.run.sampling
    mine = samp[samp["step"] == last].set_index("stage")["host_ms"]
    assert mine["probe"] >= 50.0
    assert mine.sum() == pytest.approx(steps.set_index("step").loc[last, "outside_ms"], abs=1e-9)


def test_the_run_window_opens_where_a_stopwatch_around_generate_would():
    """TTFT and total_ms count from the first statement of the generate wrapper: the probe's own
    start-of-generate work (here an observer that takes 5 ms) is inside them and stated apart."""
    clock = VirtualClock()

    class SlowStart(Observer):
        def run_begin(self, run) -> None:
            clock.spend(5_000_000)

    model = tiny_llama(layers=2)
    with probe.attach(model, clock=clock, observers=[SlowStart()]) as p:
        before = clock()
        model.generate(_ids(), max_new_tokens=3, do_sample=False)
        after = clock()
    gen = p.run.runs.set_index("kind").loc["generate"]
    steps = p.run.steps
    assert 5.0 < gen["probe_start_ms"] < 5.01
    assert steps["start_ms"].iloc[0] > gen["probe_start_ms"]  # the first forward starts after it
    assert gen["ttft_ms"] == pytest.approx(steps["start_ms"].iloc[1], abs=1e-12)  # counted from the same origin
    stopwatch_ns = after - before
    # the window opens at the wrapper's first read (the stopwatch's next tick) and closes when
    # generate returns: the stopwatch holds only the probe's few clock reads after that
    assert 0 < stopwatch_ns - gen["total_ms"] * 1e6 < 1_000


def test_observers_are_checked_against_what_they_declare():
    model = tiny_llama(layers=2)

    class Undeclared(StepCounter):
        columns = {"steps": {"counted": "Int64"}}  # returns a runs column it does not declare

    with probe.attach(model, observers=[Undeclared()]) as p:
        model(_ids(3))
    with pytest.raises(ValueError, match="counted_steps"):
        p.run

    class WrongDtype(Observer):
        columns = {"steps": {"forward_ms": "Int64"}}  # a schema column at another dtype

    with pytest.raises(TypeError, match="forward_ms"):
        probe.attach(model, observers=[WrongDtype()])
    with pytest.raises(TypeError, match="Observer"):
        probe.attach(model, observers=[object()])
    assert probe.probe_of(model) is None  # a refused attach leaves nothing behind


def test_the_recorder_and_the_frames_know_only_the_observer_interface():
    """Neither the recorder nor the frame builder imports a concrete observer: a new one needs no change there."""
    from test_layout import import_graph

    graph, _ = import_graph()
    concrete = {"probe.recording.sampling", "probe.recording.serving", "probe.recording.noise",
                "probe.recording.stages", "probe.recording.serving_frames", "probe.recording.serving_watch"}
    for module in ("probe.recording.recorder", "probe.analysis.frames", "probe.analysis.observed",
                   "probe.capture.lifecycle"):
        assert not graph[module] & concrete, f"{module} imports {sorted(graph[module] & concrete)}"


def test_an_observer_that_fails_closing_a_run_leaves_the_run_closed_and_the_others_run(caplog):
    """An observer raising in step_end, run_closing and run_end: generate's output is unchanged,
    the run is closed (status, total_ms), the other observers still close theirs (each step's
    sampling stages, the sampling wrappers off the model at once, the CPU time read), and each
    failure is logged."""

    class Failing(Observer):
        def step_end(self, step, kwargs, out, error) -> None:
            raise RuntimeError("step end failed")

        def run_closing(self, run) -> None:
            raise RuntimeError("closing failed")

        def run_end(self, run) -> None:
            raise RuntimeError("end failed")

    model = tiny_llama(layers=2)
    want = model.generate(_ids(), max_new_tokens=4, do_sample=False)
    with probe.attach(model, observers=[Failing()]) as p:
        for _ in range(2):
            with caplog.at_level("WARNING", logger="probe"):
                got = model.generate(_ids(), max_new_tokens=4, do_sample=False)
            assert torch.equal(got, want)
            assert "_get_logits_processor" not in model.__dict__  # the sampling observer's end still ran
    gen = p.run.runs[p.run.runs["kind"] == "generate"]
    assert gen["status"].tolist() == ["ok", "ok"]
    assert gen["total_ms"].notna().all() and (gen["probe_end_ms"] >= 0).all()
    assert gen["process_cpu_ms"].notna().all()  # RunCpu's closing reads were taken
    assert p.run.steps.groupby("run_id").size().tolist() == [4, 4]
    samp = p.run.sampling
    assert samp.groupby("run_id")["step"].nunique().tolist() == [4, 4]  # every step's stages, to the last
    failed = [r.getMessage() for r in caplog.records if "Failing failed" in r.getMessage()]
    hooks = [m.split(" failed in ")[1].split(";")[0] for m in failed]
    assert sorted(hooks) == sorted(["step_end"] * 8 + ["run_closing", "run_end"] * 2)
