"""Missing packages: say which one, and the command that installs it.

Every package probe needs (torch, transformers, accelerate, sentencepiece, pandas, pyarrow,
plotly, streamlit, gguf) is a plain dependency of ``genprobe``, so one ``pip install`` gives run,
report and dashboard. An error about a missing package still happens — an environment made by
hand, a package removed later, or transformers asking for something new — and then it names the
command that fixes it. Standard library only: the CLI imports this before torch.
"""

from __future__ import annotations

import importlib.util
import re

#: import name -> PyPI distribution name, where they differ
_DISTRIBUTIONS = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf", "yaml": "pyyaml",
                  "PIL": "pillow", "sklearn": "scikit-learn"}

#: packages transformers asks for by name in its messages ("accelerate is required ...")
_KNOWN = ("accelerate", "gguf", "sentencepiece", "protobuf", "tiktoken", "bitsandbytes", "optimum",
          "flash_attn", "einops", "safetensors", "tokenizers", "plotly", "streamlit", "pyarrow", "pandas")
_REQUIRED = re.compile(r"\b(" + "|".join(_KNOWN) + r")\b[^.;:]{0,40}\b(?:is|are) (?:required|needed|not installed)",
                       re.I)
_NO_MODULE = re.compile(r"No module named '([A-Za-z0-9_.]+)'")


def install_command(*packages: str) -> str:
    """``python3 -m pip install P ...`` for the given distributions."""
    return "python3 -m pip install " + " ".join(packages)


def missing(*modules: str) -> list[str]:
    """The import names among ``modules`` that cannot be imported here (found without importing)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def distribution(module: str) -> str:
    """The PyPI name that provides import name ``module`` (its top-level package)."""
    if module in _DISTRIBUTIONS:
        return _DISTRIBUTIONS[module]
    top = module.split(".")[0]
    return _DISTRIBUTIONS.get(top, top.replace("_", "-"))


def require(what: str, *modules: str) -> None:
    """Raise :class:`ImportError` naming the install command when one of ``modules`` is missing.

    Args:
        what: what needs them, for the message ("the dashboard").
        modules: import names.
    """
    gone = missing(*modules)
    if gone:
        dists = [distribution(m) for m in gone]
        raise ImportError(f"{what} needs {', '.join(dists)}, which {'is' if len(dists) == 1 else 'are'} not "
                          f"installed: {install_command(*dists)}")


def hint(exc: BaseException) -> str | None:
    """The install command for the package an exception says is missing, or ``None``.

    Reads :class:`ImportError`'s ``name`` and the wording transformers uses ("accelerate is
    required when loading a GGUF file", "No module named 'gguf'").
    """
    name = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    text = str(exc)
    if not name:
        m = _NO_MODULE.search(text) or _REQUIRED.search(text)
        name = m.group(1) if m else None
    if not name or not missing(name):
        return None
    return install_command(distribution(name))
