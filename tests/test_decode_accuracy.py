"""The accuracy study of fused INT8 decoding (kvpack.study.decode_accuracy), small, on the CPU path,
against the float64 reference."""

import numpy as np
import pytest
import torch

from kvpack import reference
from kvpack.pipeline import environment
from kvpack.report import assemble
from kvpack.study import decode_accuracy as da
from kvpack.study import records


def on_grid(B, H, T, D, seed):
    """fp16 values already on the int8 grid of both granularities: integers in [-127, 127] times 2^-7, with
    127 in every row and every column, so that either scale is exactly 2^-7 and every value quantizes exactly."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-126, 127, (B, H, T, D), generator=g)
    t = torch.arange(T)
    ints[..., t, t % D] = 127
    return (ints.float() * 2.0**-7).half()


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_exact_cache_agrees_everywhere(granularity):
    B, Hq, Hkv, T, D = 2, 4, 2, 128, 64
    K, V = on_grid(B, Hkv, T, D, 0), on_grid(B, Hkv, T, D, 1)
    q = (torch.rand(B, Hq, D, generator=torch.Generator().manual_seed(2)) * 2 - 1).half()
    m = da.combine([da.measure(q, K, V, granularity, "cpu")])
    assert m["top1_agreement"] == 1.0
    assert m["int8_reference_max_abs_error"] == 0.0  # the dequantized cache is the unquantized one
    # what is left is the kernel's own fp16 rounding, about as large as fp16 SDPA's
    assert m["max_abs_error"] < 4e-3 and m["rel_l2_error"] < 4e-3
    assert m["max_abs_error"] == m["kernel_vs_int8_reference_max_abs"]


def test_measure_against_the_float64_reference():
    q, K, V = da.synthetic_kv("uniform", 2, 4, 2, 256, 64, seed=0)
    m = da.measure(q, K, V, "token", "cpu")
    exact = reference.attention_decode(q, K, V)
    assert m["ref_sq"] == pytest.approx(float((exact ** 2).sum()))
    assert 0 < m["max_abs"] < 0.01 and m["queries"] == 8 and 0 <= m["agree"] <= 8


def test_study_rows_and_record(monkeypatch):
    from kvpack.study import realmodel

    monkeypatch.setattr(realmodel, "model_status", lambda: (False, "no model here (test)"))
    s = {"distributions": ["uniform", "outlier_keys", "real_model"], "T": 128, "batch": 2, "heads": [4, 2],
         "head_dim": 64}
    rec = da.run_decode_accuracy_job(s, "cpu", environment.provenance("cpu"))
    assert rec["kind"] == "decode_accuracy" and rec["workload"]["path"] == da.path_name("cpu")
    rows = {(r["distribution"], r["granularity"], r["bits"]): r for r in rec["rows"]}
    assert set(rows) == {(d, g, b) for d in ("uniform", "outlier_keys", "real_model") for g in ("token", "channel")
                         for b in (8, 4)}
    assert rows[("real_model", "token", 8)]["status"] == "skipped"
    assert rows[("real_model", "token", 4)]["skip_reason"] == "no model here (test)"
    for d in ("uniform", "outlier_keys"):
        for g in ("token", "channel"):
            for b in (8, 4):
                r = rows[(d, g, b)]
                assert r["status"] == "ok" and 0 <= r["top1_agreement"] <= 1 and r["queries"] == 8
                assert np.isfinite(r["rel_l2_error"]) and r["fp16_sdpa_rel_l2_error"] < r["rel_l2_error"] + 1e-3
                assert r["int4_group"] == (32 if b == 4 else None)
            # 4 bits: steps 18x coarser (absmax / 7 against / 127): more error than INT8 everywhere
            assert rows[(d, g, 4)]["rel_l2_error"] > rows[(d, g, 8)]["rel_l2_error"]
            # the kernel's own rounding stays far below the quantization's at either width
            for b in (8, 4):
                assert rows[(d, g, b)]["kernel_vs_int8_reference_max_abs"] < 0.1 * rows[(d, g, b)]["int8_reference_max_abs_error"] + 1e-3
    # a few large channels hurt one scale per token more than one per channel
    assert rows[("outlier_keys", "token", 8)]["rel_l2_error"] > rows[("outlier_keys", "channel", 8)]["rel_l2_error"]
    assert rows[("uniform", "token", 8)]["rel_l2_error"] < 0.02


def test_table_from_the_record(tmp_path, monkeypatch):
    from kvpack.study import realmodel

    monkeypatch.setattr(realmodel, "model_status", lambda: (False, "no model here (test)"))
    rec = da.run_decode_accuracy_job({"distributions": ["uniform", "real_model"], "T": 64, "batch": 1,
                                      "heads": [2, 1], "head_dim": 64}, "cpu", environment.provenance("cpu"))
    records.write_record(rec, tmp_path / "ref" / "decode" / "accuracy.json")
    t = assemble.build_tables(reference_dirs=[tmp_path / "ref"])
    a = t.decode_accuracy
    assert len(a) == 8 and set(a["status"]) == {"ok", "skipped"} and set(a["bits"]) == {8, 4}
    assert (a["path"] == da.path_name("cpu")).all()
    assert len(t.decode) == 0  # an accuracy record is no decode timing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_exact_cache_on_the_gpu():
    B, Hq, Hkv, T, D = 2, 8, 2, 256, 128
    K, V = on_grid(B, Hkv, T, D, 0), on_grid(B, Hkv, T, D, 1)
    q = (torch.rand(B, Hq, D, generator=torch.Generator().manual_seed(2)) * 2 - 1).half()
    m = da.combine([da.measure(q, K, V, "token", "cuda")])
    assert m["top1_agreement"] == 1.0 and m["int8_reference_max_abs_error"] == 0.0
