"""The perplexity study (kvpack.study.perplexity): its corpus, its teacher-forced evaluation through
each cache against the model's own full-sequence logits, and the committed trained model and its
records (data/models/stdlib-llama)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from kvpack.study import perplexity as ppl

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "models" / "stdlib-llama"


def test_corpus_splits_are_disjoint_and_deterministic():
    files = ppl.corpus_files()
    assert len(files) > 100 and files == sorted(files)
    train, held = ppl.corpus("train"), ppl.corpus("heldout")
    assert len(held) > 100_000 and len(train) > 10 * len(held)
    assert ppl.corpus("heldout") == held
    first_held = files[0].read_bytes()
    assert held.startswith(first_held) and not train.startswith(first_held)
    with pytest.raises(ValueError, match="split must be"):
        ppl.corpus("test")


def test_teacher_forced_exact_nll_equals_the_full_sequence_forward():
    """Through transformers' DynamicCache ('exact'), one prefill then one byte per step gives the NLL
    the model's single full-sequence forward gives (fp32 rounding apart): the harness adds nothing."""
    model = ppl.make_model(seed=3).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    total, count = ppl.nll(model, ids, 8, "exact")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    want = -float(logp[:, 7:-1].gather(2, ids[:, 8:, None]).sum())
    assert count == 2 * 32
    assert abs(total - want) <= 1e-4 * abs(want)


@pytest.mark.parametrize("method", ppl.METHODS[1:])
def test_quantized_caches_score_the_same_bytes(method):
    model = ppl.make_model(seed=3).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    exact, n = ppl.nll(model, ids, 8, "exact")
    total, count = ppl.nll(model, ids, 8, method)
    assert count == n and math.isfinite(total)
    assert abs(total - exact) <= 0.05 * exact  # a random model: quantization moves little, but it moves
    assert total != exact


@pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="no trained model committed")
def test_the_committed_model_and_its_records():
    """data/models/stdlib-llama: the trained checkpoint (a few MB) loads and has the study's shape;
    its training record shows the loss falling; the perplexity record's ratios follow from its NLLs
    and every method scored the same bytes."""
    train = json.loads((MODEL / "training.json").read_text())
    assert train["kind"] == "perplexity_training" and train["model"] == ppl.MODEL_CONFIG
    curve = [c["loss"] for c in train["curve"]]
    assert curve[-1] < 0.5 * curve[0]
    assert (MODEL / "model.safetensors").stat().st_size < 16 * 2**20
    model = ppl.load_model(MODEL)
    assert sum(p.numel() for p in model.parameters()) == train["params"]
    rec = json.loads((MODEL / "perplexity.json").read_text())
    rows = {r["method"]: r for r in rec["rows"]}
    assert set(rows) == set(ppl.METHODS) and len({r["tokens"] for r in rows.values()}) == 1
    for r in rows.values():
        assert abs(r["perplexity"] - math.exp(r["nll_nats"] / r["tokens"])) < 1e-9 * r["perplexity"]
        assert abs(r["vs_exact"] - r["perplexity"] / rows["exact"]["perplexity"]) < 1e-12
    from kvpack.report import headline

    assert headline.to_markdown(headline.perplexity_table()) in (ROOT / "docs" / "int4.md").read_text()


def test_int4_quality_claim(tmp_path, monkeypatch):
    """Claim int4_quality: the committed record's INT4 g32 perplexity over the unquantized one against 2%,
    and a source's INT4 top-1 agreement on outlier-channel keys (its decode accuracy rows) against 0.95;
    without those rows it is not measurable, and a record past either bound is not reproduced."""
    import json

    from kvpack.pipeline import environment
    from kvpack.report import assemble, claims
    from kvpack.study import decode_accuracy as da
    from kvpack.study import records

    rec = json.loads(claims.INT4_PERPLEXITY_RECORD.read_text())
    by = {r["method"]: r for r in rec["rows"]}
    want = by["int4_token_g32"]["perplexity"] / by["exact"]["perplexity"]
    c = assemble.build_tables().claims.set_index("claim_id").loc["int4_quality"]
    assert c["verdict"] == claims.NOT_MEASURABLE or want > 1.02  # no accuracy rows on a bare run
    assert abs(c["our_number"] - want) < 1e-12 and f"{want:.3f}x" in c["note"]

    acc = da.run_decode_accuracy_job({"distributions": ["outlier_keys"], "T": 128, "batch": 2, "heads": [8, 2],
                                      "head_dim": 64}, "cpu", environment.provenance("cpu"))
    records.write_record(acc, tmp_path / "ref" / "decode" / "accuracy.json")
    t = assemble.build_tables(reference_dirs=[tmp_path / "ref"])
    row = t.decode_accuracy[(t.decode_accuracy["bits"] == 4) & (t.decode_accuracy["granularity"] == "token")].iloc[0]
    c = t.claims.set_index("claim_id").loc["int4_quality"]
    met = row["top1_agreement"] >= 0.95 and want <= 1.02
    assert c["verdict"] == (claims.REPRODUCED if met else claims.NOT_REPRODUCED)
    assert f"top-1 agreement on outlier-channel keys {row['top1_agreement']:.2f}" in c["note"]

    for r in rec["rows"]:
        if r["method"] == "int4_token_g32":
            r["perplexity"] = by["exact"]["perplexity"] * 1.05
    bad = tmp_path / "perplexity.json"
    bad.write_text(json.dumps(rec))
    monkeypatch.setattr(claims, "INT4_PERPLEXITY_RECORD", bad)
    c = assemble.build_tables(reference_dirs=[tmp_path / "ref"]).claims.set_index("claim_id").loc["int4_quality"]
    assert c["verdict"] == claims.NOT_REPRODUCED and "1.050x" in c["note"] and "perplexity within 2%: MISSED" in c["our_value"]
