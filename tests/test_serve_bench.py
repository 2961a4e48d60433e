"""``probe serve-bench``: Poisson arrivals through the continuous-batching manager, saved as a run."""

from __future__ import annotations

import math

import numpy as np
import pytest

import probe
from probe import compat
from probe.cli import main
from probe.routines.loadgen import plan

GAP = compat.continuous_batching_gap()


def test_plan_is_seeded_poisson_with_listed_lengths():
    a = plan(200, 4.0, [8, 64], 16, vocab_size=100, seed=0)
    b = plan(200, 4.0, [8, 64], 16, vocab_size=100, seed=0)
    assert a == b and plan(200, 4.0, [8, 64], 16, vocab_size=100, seed=1) != a
    assert {len(p) for p in a.prompts} == {8, 64}
    assert all(3 <= t < 100 for p in a.prompts for t in p)
    gaps = np.diff(a.arrivals_s)
    assert a.arrivals_s[0] == 0 and (gaps >= 0).all()
    assert 0.15 < gaps.mean() < 0.35  # mean gap 1/rate = 0.25 s over 199 draws
    assert plan(5, math.inf, [4], 2, vocab_size=10).arrivals_s == [0.0] * 5
    with pytest.raises(ValueError, match="rate"):
        plan(5, 0, [4], 2, vocab_size=10)


@pytest.mark.parametrize("args,needle", [
    (["--requests", "0"], "--requests must be >= 1"),
    (["--rate", "0"], "--rate must be > 0"),
    (["--prompt-lens", "8,x"], "--prompt-lens takes comma-separated integers"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, needle):
    if GAP is not None:
        assert main(["serve-bench", *args, "--out", str(tmp_path / "r")]) == 2
        assert "transformers>=5" in capsys.readouterr().err
        return
    assert main(["serve-bench", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(GAP is not None, reason=f"continuous batching not profiled here: {GAP}")
def test_serve_bench_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "serve"
    code = main(["serve-bench", "tiny", "--requests", "5", "--rate", "50", "--prompt-lens", "8,24", "--max-new-tokens", "3",
                 "--max-batch-tokens", "32", "--seed", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "TTFT ms" in captured.out and "requests ok 5" in captured.out
    run = probe.load(out)
    assert run.runs["kind"].tolist() == ["serve"] and run.runs["status"].iloc[0] == "ok"
    rq = run.requests
    assert len(rq) == 5 and (rq["status"] == "ok").all() and (rq["generated_tokens"] == 3).all()
    assert set(rq["prompt_tokens"]) <= {8, 24}
    assert run.meta["serve_bench"]["requests"] == 5 and run.meta["serving"]["cuda_graphs"].startswith("off")
    assert run.meta["serve_bench"]["send_lag_ms_max"] >= 0  # how late the requests went out, stated
    assert (run.steps["prefill_tokens"] + run.steps["decode_tokens"] == run.steps["q_len"]).all()
    assert (out / "report.html").exists() and (out / "csv" / "requests.csv").exists()
    ok = rq.dropna(subset=["tf_ttft_ms"])
    assert len(ok) == 5
    # both clocks stamped every request; how closely they agree is measured, not asserted
    assert (ok["ttft_ms"] > 0).all() and (ok["tf_ttft_ms"] > 0).all()
