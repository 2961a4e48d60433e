"""The attention function, timed as a call of its own inside each recorded attention module.

An attention module of transformers (``LlamaAttention`` and its kin, on 4.57 and 5.x) looks its
attention function up at every call — ``sdpa``, ``flash_attention_*``, ``flex_attention``, the
paged ones from the process-wide registry ``ALL_ATTENTION_FUNCTIONS`` (the class mapping of
``transformers.modeling_utils.AttentionInterface``), ``eager`` from its modeling module's global
``eager_attention_forward`` — and calls it with itself as the first argument. It is a function,
not a module, so no forward wrapper reaches it: without this, the attention module's self time
holds the function together with RoPE, the cache update, reshapes and dispatch.

While any probe is attached, every registry entry and the ``eager_attention_forward`` of each
attached model's modeling module is replaced by a wrapper (held by every attached probe; the
originals go back at the last detach, or when the last holder is collected, where nothing
replaced the wrapper since). A call whose
``module`` is a recorded attention module of an attached probe is recorded like a module call,
as the pseudo-module ``<attention module>.attention_fn`` (role ``attention_fn``) one level
below it; any other call goes straight through. The wrapper is a ``functools.partial`` of the
original (:class:`probe.recording.hotpath.PartialWrapper`), so compiled code traces the original.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable, Iterable

from torch import nn

from .hotpath import PartialWrapper

#: the pseudo-module's attribute name under its attention module, and its role
NAME = "attention_fn"
ROLE = "attention_fn"

# id of a recorded attention module -> (a weak reference to it, one to its recorded caller
# ``rc(fn, module, *args, **kwargs)``, which its probe holds): weak both ways, as the caller
# leads to the model. Keyed on the id, so an attention call costs one dict lookup (a
# WeakKeyDictionary would build a weak reference to look up every call); the module's own weak
# reference confirms the id and takes the entry out when the module goes.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}
_LOCK = threading.RLock()
# whatever holds the wrapping (each attached probe), weakly: a probe never detached releases it
# when it is collected
_HOLDERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
# (namespace dict, key, original, wrapper) of every entry replaced while any probe is attached
_SAVED: list[tuple[dict, str, Any, Any]] = []


def through(fn: Callable, *args, **kwargs) -> Any:
    """What a recorded caller wraps: the attention function of this call, called as given."""
    return fn(*args, **kwargs)


def _dispatch(fn: Callable) -> Callable:
    owners_get = _OWNERS.get

    def attention_function(module, *args, **kwargs):
        got = owners_get(id(module))
        rc = got[1]() if got is not None and got[0]() is module else None
        if rc is None:
            return fn(module, *args, **kwargs)
        return rc(fn, module, *args, **kwargs)

    return attention_function


def _is_ours(fn: Any) -> bool:
    return isinstance(fn, PartialWrapper) and getattr(fn, "_attention_fn", False)


def _wrap(space: dict, key: str) -> None:
    fn = space.get(key)
    if fn is None or not callable(fn) or _is_ours(fn):
        return
    w = PartialWrapper(fn, _dispatch(fn))
    w._attention_fn = True
    space[key] = w
    _SAVED.append((space, key, fn, w))


def _wrap_registry() -> None:
    for space, key in entries(()):
        _wrap(space, key)


def _wrap_eager(modules: list[nn.Module]) -> None:
    for space, key in entries(modules):
        if key == "eager_attention_forward":
            _wrap(space, key)


def acquire(holder: Any, callers: dict[nn.Module, Callable]) -> None:
    """Record the attention function of each module of ``callers`` (attention module -> its
    recorded caller, which the caller of this keeps alive) for ``holder`` (a probe) from now on;
    the first holder wraps the registry."""
    with _LOCK:
        if holder not in _HOLDERS:
            _HOLDERS.add(holder)
            weakref.finalize(holder, _restore_if_unheld)
        _wrap_registry()
        _wrap_eager(list(callers))
        for mod, rc in callers.items():
            key = id(mod)
            _OWNERS[key] = (weakref.ref(mod, lambda _, key=key: _OWNERS.pop(key, None)), weakref.ref(rc))


def refresh() -> None:
    """Wrap registry entries registered since (``AttentionInterface.register``), at each generate."""
    with _LOCK:
        if _held():
            _wrap_registry()


def release(holder: Any, modules: Iterable[nn.Module]) -> None:
    """Stop recording ``modules``' attention function for ``holder``; the last holder puts every
    original back."""
    with _LOCK:
        for mod in modules:
            got = _OWNERS.get(id(mod))
            if got is not None and got[0]() is mod:
                del _OWNERS[id(mod)]
        _HOLDERS.discard(holder)
        _restore_if_unheld()


def _held() -> bool:
    # iteration skips holders being collected (len() may still count them in their finalizer)
    return any(True for _ in _HOLDERS)


def _restore_if_unheld() -> None:
    with _LOCK:
        if _held():
            return
        saved = list(_SAVED)
        _SAVED.clear()
        put_back(saved)


def put_back(replaced: list[tuple]) -> None:
    """Put back ``(namespace, key, original, wrapper)`` entries, last first, where nothing
    replaced the wrapper since."""
    for space, key, fn, w in reversed(replaced):
        if space.get(key) is w:
            space[key] = fn


def wrapped() -> int:
    """How many attention functions are wrapped now (0 while no probe is attached)."""
    return len(_SAVED)


def pseudo_name(attention: str) -> str:
    return f"{attention}.{NAME}"


def entries(modules: Iterable[nn.Module]) -> list[tuple[dict, str]]:
    """``(namespace, key)`` of every attention function ``modules``' attention may call now: the
    registry's entries and their modeling modules' ``eager_attention_forward`` (what this module
    wraps while a probe records at depth sublayers or all; a deep pass wraps them for its steps)."""
    mu = sys.modules.get("transformers.modeling_utils")
    cls = getattr(mu, "AttentionInterface", None)
    out = []
    for space in (getattr(cls, "_global_mapping", None),
                  getattr(getattr(mu, "ALL_ATTENTION_FUNCTIONS", None), "_local_mapping", None)):
        if isinstance(space, dict):
            out += [(space, key) for key in list(space) if callable(space[key])]
    for name in {type(m).__module__ for m in modules}:
        mod = sys.modules.get(name)
        if mod is not None and callable(getattr(mod, "eager_attention_forward", None)):
            out.append((mod.__dict__, "eager_attention_forward"))
    return out
