"""When the probe's own work fails while recording a call, both forward wrappers (the C one and
its Python reference) behave alike: an ``Exception`` drops that one record and warns once, the
user's forward returns its result; ``KeyboardInterrupt`` and other ``BaseException``\\ s propagate
(a Ctrl-C is never swallowed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from probe.recording import hotpath

KINDS = ["python"] + (["c"] if hotpath.C is not None else [])


def _wrap(kind: str, fn, intern, now=None):
    native = kind == "c"
    cols = hotpath.new_columns(native)
    return hotpath.cpu_wrapper(fn, cols, intern, now, native=native), cols


def _failing(exc: BaseException, after: int = 0):
    """An intern that works ``after`` times, then raises ``exc`` each time."""
    calls = []

    def intern(args, kwargs, out):
        calls.append(1)
        if len(calls) > after:
            raise exc
        return len(calls)

    return intern


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_while_recording_drops_that_record_and_warns_once(kind):
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    fwd, cols = _wrap(kind, lin.forward, _failing(ValueError("no signature for this")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fwd(x) for _ in range(3)]
    for out in outs:
        assert torch.equal(out, lin(x))  # the user's forward ran and returned its result
    assert len(cols) == 0 and cols.dropped == 3
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "could not be recorded" in msgs[0] and "ValueError: no signature for this" in msgs[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_keyboard_interrupt_and_system_exit_while_recording_propagate(kind, exc):
    lin = nn.Linear(4, 3)
    fwd, cols = _wrap(kind, lin.forward, _failing(exc))
    with pytest.raises(type(exc)):
        fwd(torch.randn(2, 4))
    assert len(cols) == 0 and cols.dropped == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_clock_before_the_call_leaves_it_unrecorded_but_run(kind):
    ticks = iter([ValueError("clock gone")] + list(range(100, 200)))

    def now():
        v = next(ticks)
        if isinstance(v, Exception):
            raise v
        return v

    lin = nn.Linear(4, 3)
    x = torch.randn(1, 4)
    fwd, cols = _wrap(kind, lin.forward, _failing(ValueError(), after=10), now=now)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = fwd(x), fwd(x)
    assert torch.equal(first, lin(x)) and torch.equal(second, lin(x))
    assert cols.dropped == 1 and len(cols) == 1  # the second call recorded as usual


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_inner_call_keeps_the_outer_calls_descendant_count_exact(kind):
    """Records stay in post-order with exact descendant counts: the outer call counts only the
    inner records that were actually made."""
    native = kind == "c"
    cols = hotpath.new_columns(native)
    inner = nn.Linear(4, 4)
    ok = iter(range(1, 100))
    inner_fwd = hotpath.cpu_wrapper(inner.forward, cols, _failing(RuntimeError("inner")), None, native=native)
    outer_fwd = hotpath.cpu_wrapper(lambda x: inner_fwd(inner_fwd(x)), cols, lambda a, k, o: next(ok), None,
                                    native=native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outer_fwd(torch.randn(1, 4))
    assert len(cols) == 1 and cols.dropped == 2
    assert memoryview(cols.columns()[3]).cast("i").tolist() == [0]


class _Trap(dict):
    """An output a module may return, whose ``values()`` fails: the probe's signature walk trips
    on it while the model (which reads one key) does not."""

    def values(self):
        raise RuntimeError("values() unavailable")


class _Child(nn.Module):
    def forward(self, x):
        return _Trap(y=x * 1.0)


class _Norm(nn.Module):
    """The model's final norm, through a child whose output the probe cannot key."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm, self.child = norm, _Child()

    def forward(self, x):
        return self.norm(self.child(x)["y"])


def test_a_model_keeps_generating_when_a_module_cannot_be_recorded():
    """Through ``probe.attach``: the calls whose record fails are left out and counted in the
    run's metadata, one warning says so, and generate returns exactly what it returns without
    the probe."""
    import probe
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.model.norm = _Norm(model.model.norm)
    ids = torch.tensor([[1, 5, 9, 3]])
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with probe.attach(model, depth="all") as p:
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    run = p.run
    steps = len(run.steps)
    assert steps == 4 and run.meta["dropped_calls"] == steps  # the child's call of each step
    names = set(run.calls["module"])
    assert "model.norm" in names and "model.norm.norm" in names and "model.norm.child" not in names
    assert sum("could not be recorded" in str(w.message) for w in caught) == 1
