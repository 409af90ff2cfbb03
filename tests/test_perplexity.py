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


def test_int4_perplexity_claim_from_the_record(tmp_path, monkeypatch):
    """Claim int4_perplexity: the committed record's INT4 g32 perplexity over the unquantized one, against
    2%; a record past the bound is not reproduced."""
    import json

    from kvpack.report import assemble, claims

    rec = json.loads(claims.INT4_PERPLEXITY_RECORD.read_text())
    by = {r["method"]: r for r in rec["rows"]}
    want = by["int4_token_g32"]["perplexity"] / by["exact"]["perplexity"]
    c = assemble.build_tables().claims.set_index("claim_id").loc["int4_perplexity"]
    assert c["verdict"] == (claims.REPRODUCED if want <= 1.02 else claims.NOT_REPRODUCED)
    assert abs(c["our_number"] - want) < 1e-12 and f"{want:.3f}x" in c["our_value"]
    for r in rec["rows"]:
        if r["method"] == "int4_token_g32":
            r["perplexity"] = by["exact"]["perplexity"] * 1.05
    bad = tmp_path / "perplexity.json"
    bad.write_text(json.dumps(rec))
    monkeypatch.setattr(claims, "INT4_PERPLEXITY_RECORD", bad)
    c = assemble.build_tables().claims.set_index("claim_id").loc["int4_perplexity"]
    assert c["verdict"] == claims.NOT_REPRODUCED and "1.050x" in c["our_value"]
