"""The overhead benchmark runs end to end and states its own noise (no timing is asserted:
speed targets are judged by the benchmark itself, on a quiet machine, never in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402


def test_overhead_benchmark_runs_every_configuration_and_its_aa_control(tmp_path):
    out = tmp_path / "o.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--runs", "1", "--repeats", "1", "--layers", "2",
         "--new-tokens", "3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: a target not met on this machine, now
    data = json.loads(out.read_text())
    for key in ("cpu_s", "first_cpu_s"):
        assert set(data["median"][key]) == set(overhead.CONFIGS)
        assert data["median"][key]["none"] == 1.0
    aa = data["median"]["cpu_s"]["none-again"], data["median"]["first_cpu_s"]["none-again"]
    assert data["noise"] == pytest.approx(max(abs(v - 1) for v in aa))
    assert "A/A control: none-again reads" in r.stdout
    for target in overhead.TARGETS:
        assert f"{target:<18}" in r.stdout and "target <=" in r.stdout
    roles = data["roles"]
    # the probe's per-role figures against the plain wrapper's, as ms and as shares of the forward
    assert {"embed", "layer", "norm", "head", "residue"} <= set(roles["share_ratio"])
    assert all(v > 0 for v in roles["share_ratio"].values())
    assert roles["probe"]["probe"] >= 0 and roles["plain"]["forward"] > 0
    # in situ: one wrapper on a layer at blocks, more below it at deeper depths
    situ = data["in_situ"]
    assert situ["blocks"]["wrappers"] == 1 < situ["sublayers"]["wrappers"] < situ["all"]["wrappers"]
    assert all(v["bare_us"] > 0 and v["wrapped_us"] > 0 for v in situ.values())


def test_verdict_says_when_a_run_cannot_tell():
    assert overhead.verdict(1.01, 1.015, 1.02, 0.001) == "PASS"
    assert overhead.verdict(1.03, 1.01, 1.02, 0.001) == "FAIL"
    assert overhead.verdict(1.03, 1.01, 1.02, 0.05).startswith("FAIL (within this run's noise")
    assert overhead.verdict(1.0, 1.0, 1.02, 0.05).startswith("PASS (within")


def test_instruction_counts_are_read_per_dump_name(tmp_path):
    # two dumps as callgrind writes them, and the unnamed one it writes when the program ends
    (tmp_path / "cg.7.1").write_text("version: 1\ncreator: callgrind-3.19.0\ndesc: Trigger: Client Request: "
                                     "none|first\nsummary: 1000\ntotals: 1000\n")
    (tmp_path / "cg.7.2").write_text("desc: Trigger: Client Request: probe-all|steady\nsummary: 1028\n")
    (tmp_path / "cg.7").write_text("desc: Trigger: Program termination\nsummary: 11\n")
    assert overhead.read_counts(tmp_path) == {"none|first": 1000, "probe-all|steady": 1028}


def test_the_plain_wrapper_reference_passes_what_generate_passes():
    """The overhead benchmark's hand-written reference keeps the forward's signature, so generate
    asks it for the last position's logits only (logits_to_keep=1), as it asks the probe."""
    import inspect

    from probe.models import load_bundled


    model, tok = load_bundled(num_hidden_layers=2)
    ids = tok("我喜欢攀岩", return_tensors="pt")["input_ids"]
    heads = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: heads.append(tuple(out.shape)))
    try:
        with overhead.PlainWrappers(model):
            assert "logits_to_keep" in inspect.signature(model.forward).parameters
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert heads[0][1] == 1, heads  # prefill: one position, not the whole prompt


def test_analysis_scale_benchmark_prints_each_ratio_with_its_target():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "analysis_scale.py"), "--calls", "20000", "--many", "3",
         "--repeat", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: a target not met on this machine, now
    for line in ("probe.load / pyarrow read+to_pandas", "summary() / probe.load", "tree() / probe.load",
                 "load peak RSS growth / frames' memory", "calls frame in memory, bytes per row",
                 "probe report beyond its load, small run", "probe report (html) / probe.load",
                 "probe compare / probe.load of both", "dashboard first page, 3 runs"):
        assert line in r.stdout and "target" in r.stdout, r.stdout
    assert "modules `probe report` imported of torch, transformers: none" in r.stdout


def test_deep_clock_benchmark_compares_each_clock_per_op_kind():
    """Each instrument's ops line up with torch.profiler's (the same kinds, one ratio per column)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deep_clock.py"), "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith("aten::")]
    assert {"aten::mm", "aten::mean", "aten::view"} <= {row[0] for row in rows}
    assert all(len(row) == 7 and all(float(v) > 0 for v in row[1:]) for row in rows)
    assert "did not see the same ops" not in r.stdout
    assert "within 10 %: profiler again" in r.stdout
