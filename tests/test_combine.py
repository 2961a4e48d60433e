"""``probe.columns.combine``: rows of several frames (parts of a run, ranks, runs) in one, in the
order given, each column at the dtype of the frames that hold values in it, on pandas 2 and 3."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from probe.columns import combine
from tiny import tiny_llama


@pytest.fixture(scope="module")
def calls() -> pd.DataFrame:
    model = tiny_llama(layers=2)
    with probe.attach(model, depth="sublayers") as p:
        model.generate(torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, do_sample=False)
    return p.run.calls


def _parts(calls: pd.DataFrame) -> list[pd.DataFrame]:
    """The calls split by step (three parts), the middle one lacking its figures: ``cpu_ms`` and
    ``layer`` all ``None`` at object dtype, as a part that never had them is built."""
    steps = sorted(calls["step"].unique())
    parts = [calls[calls["step"] == s] for s in steps[:3]]
    n = len(parts[1])
    parts[1] = parts[1].assign(cpu_ms=pd.Series([None] * n, dtype=object, index=parts[1].index),
                               layer=pd.Series([None] * n, dtype=object, index=parts[1].index))
    return parts


def test_rows_in_input_order_and_dtypes_of_the_frames_with_values(calls):
    parts = _parts(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pandas 2's FutureWarning on all-null columns included
        out = combine(parts)
    assert len(out) == sum(map(len, parts))
    assert out["step"].tolist() == [s for p in parts for s in p["step"]]
    assert out["cpu_ms"].dtype == np.float64 and out["layer"].dtype == calls["layer"].dtype
    mid = slice(len(parts[0]), len(parts[0]) + len(parts[1]))
    assert out["cpu_ms"].iloc[mid].isna().all() and out["layer"].iloc[mid].isna().all()
    first = parts[0].reset_index(drop=True)
    np.testing.assert_array_equal(out["cpu_ms"].iloc[:len(first)], first["cpu_ms"])
    assert list(out.columns) == list(calls.columns)


def test_a_frame_without_values_or_columns_keeps_its_place(calls):
    parts = _parts(calls)
    blank = pd.DataFrame(index=range(2))  # rows and no columns: nulls in every column, in place
    nulls = parts[1].iloc[:2].assign(**{c: None for c in parts[1].columns})  # rows with every column null
    out = combine([parts[0], blank, nulls, parts[2]])
    k = len(parts[0])
    assert len(out) == k + 4 + len(parts[2])
    assert out.iloc[k:k + 4].isna().all().all()
    assert out["step"].iloc[:k].tolist() == parts[0]["step"].tolist()
    assert out["step"].iloc[k + 4:].tolist() == parts[2]["step"].tolist()
    assert out["cpu_ms"].dtype == np.float64


def test_categoricals_stay_categoricals_with_the_union_of_categories(calls):
    a = calls[calls["step"] == 0].assign(module=lambda d: d["module"].astype(str).astype("category"))
    b = calls[calls["step"] == 1].iloc[:3].assign(module=lambda d: (d["module"].astype(str) + "!").astype("category"))
    c = calls[calls["step"] == 1].iloc[3:].assign(module=lambda d: d["module"].astype(str))  # plain text
    out = combine([a, b, c])
    assert isinstance(out["module"].dtype, pd.CategoricalDtype)
    cats = list(out["module"].cat.categories)
    assert cats == sorted(cats) and set(cats) == set(a["module"].astype(str)) | set(b["module"].astype(str)) \
        | set(c["module"])
    assert out["module"].astype(str).tolist() == [*a["module"].astype(str), *b["module"].astype(str), *c["module"]]


def test_empty_frames_keep_every_column_at_its_dtype(calls):
    out = combine([calls.iloc[:0], calls.iloc[:0].drop(columns=["cpu_ms"])])
    assert out.empty and list(out.columns) == list(calls.columns)
    assert (out.dtypes == calls.dtypes).all()
    assert combine([]).empty
