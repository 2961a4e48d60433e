"""`probe run` end to end on the bundled model and on model directories, including bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import probe
from probe import fmt
from probe.cli import main
from probe.models import load_bundled, save_bundled


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bundled_model_acceptance_walk(tmp_path, capsys):
    """The tutorial's walk on the bundled model: prompt 我喜欢攀岩, 10 new tokens."""
    out_dir = tmp_path / "run"
    code, out, err = _run(["run", "--prompt", "我喜欢攀岩", "--max-new-tokens", "10", "--full-logits",
                           "--out", str(out_dir), "--no-report"], capsys)
    assert code == 0, err
    assert "prefill" in out and "decode" in out and f"run saved to {out_dir}" in out
    listed = out[out.index("run saved to"):].splitlines()[0]
    assert all(f.name in listed for f in out_dir.iterdir() if f.is_file())  # the line names every file saved
    run = probe.load(out_dir)
    model, tok = load_bundled()
    P = tok("我喜欢攀岩", return_tensors="pt")["input_ids"].shape[-1]
    H, V, L = model.config.hidden_size, model.config.vocab_size, model.config.num_hidden_layers
    st = run.steps
    assert len(st) == 10
    assert st.iloc[0]["phase"] == "prefill" and (st["phase"].iloc[1:] == "decode").all()
    assert list(st["kv_len"]) == [0] + [P + i for i in range(9)]
    pre = run.calls[run.calls["step"] == 0]
    shapes = {m: (json.loads(i), json.loads(o)) for m, i, o in zip(pre["module"], pre["in_shapes"], pre["out_shapes"])}
    assert shapes["model.embed_tokens"] == ([[1, P]], [[1, P, H]])
    for i in range(L):
        assert shapes[f"model.layers.{i}"][1] == [[1, P, H]]
    assert shapes["model.norm"][1] == [[1, P, H]]
    assert shapes["lm_head"][1] == [[1, P, V]]
    dec = run.calls[run.calls["phase"] == "decode"]
    assert all(json.loads(s)[0][:2] == [1, 1] for s in dec["out_shapes"])
    r = run.runs.iloc[0]
    assert r["model_id"] == "probe-tiny-llama-32l" and r["new_tokens"] == 10 and r["status"] == "ok"
    assert run.meta["prompt"] == "我喜欢攀岩"


def test_run_a_saved_model_directory_with_sampling_and_batch(tmp_path, capsys):
    model_dir = save_bundled(tmp_path / "model", num_hidden_layers=2)
    code, out, err = _run([
        "run", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "4", "--do-sample",
        "--top-k", "10", "--top-p", "0.85", "--temperature", "1.0", "--batch-size", "2",
        "--depth", "sublayers", "--out", str(tmp_path / "r"), "--no-report",
    ], capsys)
    assert code == 0, err
    run = probe.load(tmp_path / "r")
    r = run.runs.iloc[0]
    assert r["batch"] == 2 and bool(r["do_sample"]) and r["top_k"] == 10
    assert {"attention", "mlp"} <= set(run.calls["role"])
    assert r["model_id"] == str(model_dir)


def test_cli_matches_python_api_tokens(tmp_path, capsys):
    """`probe run` generates the same tokens as a plain generate without the probe."""
    model, tok = load_bundled()
    inputs = tok("我喜欢攀岩", return_tensors="pt")
    ref = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(ref[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
    code, out, err = _run(["run", "--max-new-tokens", "5", "--out", str(tmp_path / "r"), "--no-report"], capsys)
    assert code == 0, err
    assert f"generated  {text!r}" in out


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
])
def test_missing_or_broken_model_directory_is_a_clear_error(tmp_path, capsys, make, needle):
    target = make(tmp_path)
    code, out, err = _run(["run", str(target), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_corrupt_weights_are_a_clear_error(tmp_path, capsys):
    model_dir = save_bundled(tmp_path / "model", num_hidden_layers=2)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    code, out, err = _run(["run", str(model_dir), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "cannot load the model" in err


def test_bad_options_are_clear_errors(tmp_path, capsys):
    assert _run(["run", "--max-new-tokens", "0"], capsys)[0] == 2
    code, _, err = _run(["run", "--dtype", "float7", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "float7" in err
    if not torch.cuda.is_available():
        code, _, err = _run(["run", "--device", "cuda", "--out", str(tmp_path / "r")], capsys)
        assert code == 2 and "CUDA is not available" in err
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(["run", "--out", str(tmp_path / "afile" / "run")], capsys)
    assert code == 2 and "is a file" in err
    code, _, err = _run(["report", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in err


def test_prompt_file_with_invalid_utf8_is_replaced_with_a_warning(tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_bytes("我喜欢".encode() + b"\xff\xfe" + b" climbing")
    code, out, err = _run(["run", "--prompt-file", str(f), "--max-new-tokens", "2",
                           "--out", str(tmp_path / "r"), "--no-report"], capsys)
    assert code == 0
    assert "not valid UTF-8" in err
    assert "\ufffd" in probe.load(tmp_path / "r").meta["prompt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a file is unwritable for everyone
        target = tmp_path / "f"
        target.write_text("")
        code, _, err = _run(["run", "--out", str(target / "x"), "--no-report"], capsys)
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = _run(["run", "--out", str(ro / "x"), "--no-report"], capsys)
    assert code == 2 and "--out" in err


def test_python_m_probe_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "probe", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("probe ")
    r = subprocess.run([sys.executable, "-m", "probe", "run", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_summary_table_reads_like_the_frames(tmp_path, capsys):
    code, out, _ = _run(["run", "--max-new-tokens", "3", "--out", str(tmp_path / "r"), "--no-report"], capsys)
    assert code == 0
    run = probe.load(tmp_path / "r")
    ttft = run.runs.iloc[0]["ttft_ms"]
    assert f"TTFT       {fmt.ms(ttft)} ms" in out  # the report's formats (probe.fmt)
    summ = run.summary(by="role")
    layer_prefill = summ[(summ["role"] == "layer") & (summ["phase"] == "prefill")].iloc[0]
    line = next(ln for ln in out.splitlines() if ln.split()[:2] == ["layer", "prefill"])
    cells = line.split()
    assert cells[3] == fmt.ms(layer_prefill["total_ms"]) and cells[5] == fmt.ms(layer_prefill["mean_ms"])
    assert cells[6] == fmt.pct(layer_prefill["share"])
    # the columns line up: every row of the block table is as wide as its header
    head = next(i for i, ln in enumerate(out.splitlines()) if ln.startswith("block "))
    rows = out.splitlines()[head:head + 4]
    assert len({len(ln) for ln in rows}) == 1, rows
    assert isinstance(run.calls, pd.DataFrame)


def test_the_first_lines_say_prefill_vs_decode_and_the_run_keeps_the_text(tmp_path, capsys):
    code, out, _ = _run(["run", "--prompt", "我喜欢攀岩", "--max-new-tokens", "5", "--out", str(tmp_path / "r"),
                         "--no-report"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["prefill", "vs", "decode"] and "prefill" in lines[0] and "decode" in lines[0]
    run = probe.load(tmp_path / "r")
    head = run.headline().set_index("part")
    share = next(ln for ln in lines[:10] if ln.startswith("share")).split()
    assert share[1:] == [fmt.pct(head.loc[p, "share"]) for p in head.index]
    assert abs(head["share"].drop("generate").sum() - 1) < 1e-9
    # the generated text comes next, and the run keeps it with the prompt as it was run
    gen = run.generated()
    assert len(gen) == 1 and len(gen[0]["token_ids"][0]) == 5
    model, tok = load_bundled()
    assert gen[0]["text"] == [tok.decode(gen[0]["token_ids"][0], skip_special_tokens=True)]
    assert f"generated  {gen[0]['text'][0]!r}" in lines[:12]
    assert run.meta["text"]["prompt"] == tok.decode(tok("我喜欢攀岩")["input_ids"], skip_special_tokens=False)
    assert run.meta["prompt"] == "我喜欢攀岩" and run.meta["threads"]["used"] >= 1


def test_no_text_keeps_token_ids_but_no_text(tmp_path, capsys):
    code, out, _ = _run(["run", "--prompt", "secret words", "--max-new-tokens", "3", "--no-text",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    run = probe.load(tmp_path / "r")
    assert "text" not in run.meta and "prompt" not in run.meta
    assert len(run.generated()[0]["token_ids"][0]) == 3
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file():
            assert b"secret words" not in f.read_bytes(), f


def test_threads_option(tmp_path, capsys):
    code, _, err = _run(["run", "--max-new-tokens", "2", "--threads", "1", "--out", str(tmp_path / "r"),
                         "--no-report"], capsys)
    assert code == 0 and "threads: 1 (--threads 1)" in err
    assert probe.load(tmp_path / "r").meta["torch_threads"] == 1
    code, _, err = _run(["run", "--threads", "0", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--threads must be" in err and not (tmp_path / "x").exists()


def test_model_directory_whose_tokenizer_has_no_pad_token(tmp_path, capsys):
    from probe.models import load_tokenizer

    model_dir = save_bundled(tmp_path / "model", num_hidden_layers=2)
    tok = load_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    code, out, err = _run(["run", str(model_dir), "--batch-size", "2", "--max-new-tokens", "2",
                           "--out", str(tmp_path / "r"), "--no-report"], capsys)
    assert code == 0, err
    assert probe.load(tmp_path / "r").runs.iloc[0]["batch"] == 2


@pytest.mark.parametrize("flag,value,rule", [
    ("--num-beams", "0", ">= 1"), ("--warmup", "-1", ">= 0"), ("--top-p", "2", "in (0, 1]"),
    ("--temperature", "0", "> 0"), ("--top-k", "-3", ">= 0"), ("--batch-size", "0", ">= 1"),
])
def test_bad_generation_options_fail_before_loading_a_model(tmp_path, capsys, flag, value, rule):
    code, _, err = _run(["run", str(tmp_path / "never-loaded"), flag, value], capsys)
    assert code == 2 and f"{flag} must be {rule}" in err  # checked before the missing folder


def test_run_and_compare_print_each_level_once_and_say_what_differs(tmp_path, capsys):
    """`probe run --depth all` prints blocks and roles whose shares each add up to 100 %;
    `probe compare` of runs at different depths and prompts says so and keeps to the blocks."""
    import re

    model_dir = save_bundled(tmp_path / "model", num_hidden_layers=2)
    dirs = {}
    for depth, prompt in (("all", "hello world"), ("blocks", "hello there world, how are you")):
        d = tmp_path / depth
        code, out, err = _run(["run", str(model_dir), "--prompt", prompt, "--max-new-tokens", "3", "--depth", depth,
                               "--out", str(d), "--no-report"], capsys)
        assert code == 0, err
        dirs[depth] = d
        table = out[out.index("where the forward time went"):out.index("shape walk")]
        levels = re.findall(r"^(block|role)\s+phase", table, flags=re.M)
        assert levels == (["block", "role"] if depth == "all" else ["block"])
        for level in levels:
            part = table[table.index(f"{level} "):].split("\n\n")[0]
            for phase in ("prefill", "decode"):
                shares = [float(v) for v in re.findall(rf"^\S+(?: \S+)?\s+{phase}\s.*?([\d.]+)%$", part, flags=re.M)]
                assert shares and sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares)), (level, phase)
        if depth == "all":
            assert re.search(r"^attention \(rest\)\s+decode", table, flags=re.M)
    code, out, err = _run(["compare", str(dirs["all"]), str(dirs["blocks"]), "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    assert "note: the runs differ in depth (A: all, B: blocks)" in out
    assert "note: the runs differ in prompt length" in out and "differ in model" not in out
    assert re.search(r"^block\s+phase\s+A self ms", out, flags=re.M) and not re.search(r"^role\s+phase", out, flags=re.M)
    assert "Not like for like" in (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")


def test_a_model_folder_without_a_tokenizer_is_a_clear_error(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    code = main(["run", str(tmp_path / "m"), "--max-new-tokens", "2", "--out", str(tmp_path / "r"), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # transformers 5 builds an empty tokenizer for such a folder, 4.x fails to load one
    assert "holds no tokenizer" in err or "cannot load the tokenizer" in err
    assert not (tmp_path / "r").exists()
