"""kvpack.hf: the INT8 cache and the "kvpack" attention backend inside transformers models.

Tiny random-initialised models built from configs (no downloads): Llama (GQA, MHA, MQA), Mistral,
Qwen2, Qwen3. On the CPU (CI) they run in float32, where kvpack's CPU ops compute what the cache
holds in fp32, so the model over a KVPackCache can be checked against an independent reference: the
same model over a transformers cache whose rows are quantized and dequantized by kvpack.reference
(float64 NumPy). The two differ only by fp32 rounding; both differ from the unquantized model by the
quantization. The attention output of the first layer, whose inputs do not depend on the cache, is
checked against float64 attention over the unquantized K/V within reference.decode_error_bound (the
bound that follows from the quantization step). GPU tests (marker gpu) run the fused kernel, CUDA
graphs and torch.compile inside generate().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

import kvpack.hf as kh
from kvpack import reference as ref

CACHE = kh.cache_kwarg()
VOCAB = 101
# fp32 rounding: u = 2^-24 per operation over the ~10^3 operations between a cache row and a logit
# (two layers of D = 64 dot products, softmax sums, 128-wide MLPs): |d logits| <= 10^3 u max|logits|.
FP32_REL = 1e3 * 2.0**-24


def tiny_config(family: str = "llama", q_heads: int = 4, kv_heads: int = 2, head_dim: int = 64, layers: int = 2):
    common = {"vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": layers,
              "num_attention_heads": q_heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "max_position_embeddings": 512, "pad_token_id": 0, "eos_token_id": None, "bos_token_id": None}
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    raise ValueError(family)


def tiny_model(family="llama", seed=0, dtype=torch.float32, device="cpu", **shape):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **shape), attn_implementation="kvpack", dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


class FakeQuantLayer(DynamicLayer):
    """The reference: a DynamicLayer that stores each new row quantized and dequantized by
    kvpack.reference (float64), as the int8 cache holds it, and hands attention what kvpack's
    backend attends over: a prefill or several new rows over the stored past plus their own rows
    unquantized; a decode step over the stored rows, its own quantized one included."""

    def __init__(self, granularity: str):
        super().__init__()
        self.granularity = granularity
        self.scales = {}  # channel: K's and V's [B, H, D], calibrated on the first update

    def _roundtrip(self, x: torch.Tensor, which: str) -> torch.Tensor:
        b, h, t, d = x.shape
        out = np.empty((b, h, t, d))
        xs = x.detach().double().cpu().numpy()
        if self.granularity == "channel" and which not in self.scales:
            self.scales[which] = np.stack([[ref.scales(xs[i, j], "channel") for j in range(h)] for i in range(b)])
        for i in range(b):
            for j in range(h):
                s = None if self.granularity == "token" else self.scales[which][i, j]
                q, sc = ref.quantize(xs[i, j], s, self.granularity)
                out[i, j] = ref.dequantize(q, sc, self.granularity)
        return torch.from_numpy(out).to(x.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[2]
        past = (self.keys, self.values) if self.is_initialized else None
        kq, vq = self._roundtrip(key_states, "k"), self._roundtrip(value_states, "v")
        super().update(kq, vq)
        if t == 1:
            return self.keys, self.values
        if past is None:
            return key_states, value_states
        return torch.cat([past[0], key_states], 2), torch.cat([past[1], value_states], 2)


class FakeQuant4Layer(FakeQuantLayer):
    """The INT4 reference: rows roundtripped by kvpack.reference's INT4 (symmetric groups of
    ``group`` channels per token; keys per channel with granularity "channel", calibrated on the
    first update), as KVPackCache(bits=4) holds them."""

    group = 32

    def _roundtrip(self, x: torch.Tensor, which: str) -> torch.Tensor:
        b, h, t, d = x.shape
        out = np.empty((b, h, t, d))
        xs = x.detach().double().cpu().numpy()
        channel = self.granularity == "channel" and which == "k"
        if channel and which not in self.scales:
            self.scales[which] = np.stack([[ref.int4_quantize(xs[i, j], 0, True, "channel")[1] for j in range(h)]
                                           for i in range(b)])
        for i in range(b):
            for j in range(h):
                if channel:
                    s = self.scales[which][i, j]
                    r = ref._fp32(xs[i, j] / s[None, :])
                    n = np.where(s[None, :] == 0, 8, np.clip(np.rint(r), -7, 7) + 8).astype(np.uint8)
                    out[i, j] = ref.int4_dequantize(n, s, None, "channel")
                else:
                    n, sc, lo = ref.int4_quantize(xs[i, j], self.group, True, "token")
                    out[i, j] = ref.int4_dequantize(n, sc, lo, "token")
        return torch.from_numpy(out).to(x.dtype)


class FakeQuantCache(DynamicCache):
    def __init__(self, config, granularity="token", bits=8):
        layer = FakeQuantLayer if bits == 8 else FakeQuant4Layer
        layers = [layer(granularity) for _ in range(config.num_hidden_layers)]
        transformers.cache_utils.Cache.__init__(self, layers=layers)


def teacher_forced(model, cache, ids, steps, attn, attention_mask=None):
    """Prefill ids [B, P], then feed steps [B, S] one token at a time; logits of every step [B, 1+S, V]."""
    model.set_attn_implementation(attn)
    mask = attention_mask
    pos = None
    if mask is not None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{CACHE: cache})
        logits = [out.logits[:, -1]]
        for s in range(steps.shape[1]):
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
            else:
                pos = torch.full((ids.shape[0], 1), ids.shape[1] + s, device=ids.device)
            out = model(input_ids=steps[:, s:s + 1], attention_mask=mask, position_ids=pos, **{CACHE: cache})
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


FAMILIES = [("llama", 4, 2), ("llama", 4, 4), ("llama", 4, 1), ("mistral", 4, 2), ("qwen2", 4, 2), ("qwen3", 4, 2)]


@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("family,hq,hkv", FAMILIES, ids=[f"{f}-{q}x{k}" for f, q, k in FAMILIES])
def test_logits_equal_the_model_over_the_dequantized_cache(family, hq, hkv, granularity):
    model = tiny_model(family, q_heads=hq, kv_heads=hkv)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 12), generator=g)
    steps = torch.randint(1, VOCAB, (2, 6), generator=g)
    cache = kh.KVPackCache(model.config, 2, 32, granularity=granularity, device="cpu", dtype=torch.float32)
    got = teacher_forced(model, cache, ids, steps, "kvpack")
    want = teacher_forced(model, FakeQuantCache(model.config, granularity), ids, steps, "sdpa")
    exact = teacher_forced(model, DynamicCache(config=model.config), ids, steps, "sdpa")
    assert rel_err(got, want) <= FP32_REL
    # the reference is not the unquantized model: quantization moves the decode steps' logits
    assert rel_err(got[:, 1:], exact[:, 1:]) > 10 * FP32_REL
    # the prefill attends over the prompt's own K/V, as "sdpa" does
    assert rel_err(got[:, 0], exact[:, 0]) <= FP32_REL
    assert cache.lengths.tolist() == [12 + 6, 12 + 6]


@pytest.mark.parametrize("granularity", ["token", "channel"])
@pytest.mark.parametrize("family,hq,hkv", FAMILIES[:3], ids=[f"{f}-{q}x{k}" for f, q, k in FAMILIES[:3]])
def test_int4_logits_equal_the_model_over_the_dequantized_int4_cache(family, hq, hkv, granularity):
    """KVPackCache(bits=4) (CPU): the model over it gives the logits of the model over a cache of the
    reference's INT4 roundtrip of the same rows, within fp32 rounding; with per-token scales INT4
    moves the logits more than INT8 does."""
    model = tiny_model(family, q_heads=hq, kv_heads=hkv)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 12), generator=g)
    steps = torch.randint(1, VOCAB, (2, 6), generator=g)
    cache = kh.KVPackCache(model.config, 2, 32, granularity=granularity, device="cpu", dtype=torch.float32, bits=4)
    got = teacher_forced(model, cache, ids, steps, "kvpack")
    want = teacher_forced(model, FakeQuantCache(model.config, granularity, bits=4), ids, steps, "sdpa")
    exact = teacher_forced(model, DynamicCache(config=model.config), ids, steps, "sdpa")
    int8 = teacher_forced(model, kh.KVPackCache(model.config, 2, 32, granularity=granularity, device="cpu",
                                                dtype=torch.float32), ids, steps, "kvpack")
    assert rel_err(got, want) <= FP32_REL
    if granularity == "token":  # (channel: INT8 quantizes V per channel too, INT4 per token group)
        assert rel_err(got[:, 1:], exact[:, 1:]) > rel_err(int8[:, 1:], exact[:, 1:])
    assert cache.lengths.tolist() == [18, 18] and cache.layers[0].kv.k_cache.dtype == torch.uint8


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_first_layer_attention_within_the_quantization_bound(granularity):
    """Layer 0's inputs do not depend on the cache, so its decode attention over the int8 cache can be
    held to reference.decode_error_bound against float64 attention over the unquantized K/V."""
    model = tiny_model("llama", q_heads=4, kv_heads=2)
    seen = {}

    def spy(module, query, key, value, attention_mask, **kw):
        out = kh.kvpack_attention_forward(module, query, key, value, attention_mask, **kw)
        if module.layer_idx == 0:
            seen.setdefault("q", []).append(query)
            seen.setdefault("k", []).append(key)
            seen.setdefault("v", []).append(value)
            seen.setdefault("out", []).append(out[0])
        return out

    transformers.AttentionInterface.register("kvpack_spy", spy)
    transformers.masking_utils.AttentionMaskInterface.register("kvpack_spy", kh.kvpack_mask)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (1, 40), generator=g)
    cache = kh.KVPackCache(model.config, 1, 64, granularity=granularity, device="cpu", dtype=torch.float32)
    teacher_forced(model, cache, ids, torch.randint(1, VOCAB, (1, 1), generator=g), "kvpack_spy")
    q = seen["q"][1][:, :, 0].detach()                      # the decode step's query [1, Hq, D]
    k = torch.cat([seen["k"][0], seen["k"][1]], 2).detach()  # unquantized K of all 41 tokens
    v = torch.cat([seen["v"][0], seen["v"][1]], 2).detach()
    kv = cache.layers[0].kv
    ks = kv.k_scales[..., :41] if granularity == "token" else kv.k_scales
    k_err = (ks / 2).double().numpy() if granularity == "token" else \
        np.broadcast_to((kv.k_scales.max(-1, keepdim=True).values / 2).double().numpy(), (1, 2, 41))
    v_scale = kv.v_scales[..., :41] if granularity == "token" else kv.v_scales
    bound = ref.decode_error_bound(q, k, v, None, score_rel=2.0**-22, weight_rel=2.0**-22, k_err=k_err,
                                   v_err=float(v_scale.max()) / 2, out_rel=2.0**-22)
    got = seen["out"][1][:, 0].detach().double().numpy()  # [1, Hq, D]
    err = np.abs(got - ref.attention_decode(q, k, v))
    assert (err <= bound).all()
    assert err.max() > 0


def test_left_padded_batch_gives_each_sequence_its_own_logits():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, VOCAB, (1, 9), generator=g), torch.randint(1, VOCAB, (1, 5), generator=g)
    steps = torch.randint(1, VOCAB, (2, 4), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache = kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32)
    both = teacher_forced(model, cache, ids, steps, "kvpack", attention_mask=mask)
    assert cache.lengths.tolist() == [9 + 4, 5 + 4]  # the padding was never written
    for i, seq in enumerate((a, b)):
        alone = teacher_forced(model, kh.KVPackCache(model.config, 1, 16, device="cpu", dtype=torch.float32), seq,
                               steps[i:i + 1], "kvpack")
        assert rel_err(both[i:i + 1], alone) <= FP32_REL


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_chunked_prefill_equals_the_reference(granularity):
    """Several new tokens over a non-empty cache (the slow path) attend over the stored rows and
    their own, as the reference cache hands them."""
    model = tiny_model("qwen3")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    chunk = torch.randint(1, VOCAB, (2, 5), generator=g)

    def run(cache, attn):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            model(input_ids=ids, **{CACHE: cache})
            pos = torch.arange(10, 15)[None].expand(2, -1)
            return model(input_ids=chunk, position_ids=pos, **{CACHE: cache}).logits

    got = run(kh.KVPackCache(model.config, 2, 32, granularity=granularity, device="cpu", dtype=torch.float32),
              "kvpack")
    want = run(FakeQuantCache(model.config, granularity), "sdpa")
    assert rel_err(got, want) <= FP32_REL


def chunked_logits(model, cache, attn, ids, mask, steps, chunk=4):
    """Feed a (left-padded) batch ids [B, P] in chunks of ``chunk`` with its growing mask, then decode
    steps [B, S] one at a time; the logits of every position [B, P + S, V]."""
    model.set_attn_implementation(attn)
    pos_all = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    with torch.no_grad():
        for c in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, c:c + chunk], attention_mask=mask[:, :c + chunk],
                        position_ids=pos_all[:, c:c + chunk], **{CACHE: cache})
            logits.append(out.logits)
        m, pos = mask, pos_all[:, -1:]
        for s in range(steps.shape[1]):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            pos = pos + 1
            logits.append(model(input_ids=steps[:, s:s + 1], attention_mask=m, position_ids=pos,
                                **{CACHE: cache}).logits)
    return torch.cat(logits, 1)


def padded_chunks_batch(seed=6, device="cpu"):
    """Three sequences of 12 positions, one padded by 6 (longer than a chunk of 4), one by 1; 3 steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :1] = 0
    steps = torch.randint(1, VOCAB, (3, 3), generator=g)
    real = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1).bool()
    return (ids * mask).to(device), mask.to(device), steps.to(device), real.to(device)


@pytest.mark.parametrize("bits,scratch", [(8, None), (4, None), (8, 1)], ids=["int8", "int4", "int8-per-sequence"])
@pytest.mark.parametrize("family,hq,hkv", [("llama", 4, 2), ("llama", 4, 1), ("qwen3", 4, 4)])
def test_chunked_prefill_of_a_left_padded_batch(family, hq, hkv, bits, scratch, monkeypatch):
    """A left-padded batch fed in chunks of 4 (a sequence's padding outlasts the first chunk, so a
    later chunk holds padding and real rows over caches of unequal lengths, one of them empty), then
    decode steps: at every real position the logits are the reference cache's under "sdpa" (which
    stores the padding and masks it), within fp32 rounding; the padding is never written. With
    ``scratch`` = 1 byte the multi-token path takes one sequence a call, as at the largest caches."""
    if scratch is not None:
        monkeypatch.setattr(kh, "EXTEND_SCRATCH_BYTES", scratch)
    model = tiny_model(family, q_heads=hq, kv_heads=hkv)
    ids, mask, steps, real = padded_chunks_batch()
    cache = kh.KVPackCache(model.config, 3, 32, device="cpu", dtype=torch.float32, bits=bits)
    got = chunked_logits(model, cache, "kvpack", ids, mask, steps)
    want = chunked_logits(model, FakeQuantCache(model.config, "token", bits=bits), "sdpa", ids, mask, steps)
    assert rel_err(got[real], want[real]) <= FP32_REL
    assert cache.lengths.tolist() == [12 + 3, 6 + 3, 11 + 3]


def test_generate_greedy_sampling_and_beams():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def generate(cache, attn, **kw):
        model.set_attn_implementation(attn)
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **{CACHE: cache}, **kw)

    cache = kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32)
    greedy = generate(cache, "kvpack", do_sample=False)
    assert torch.equal(greedy, generate(FakeQuantCache(model.config), "sdpa", do_sample=False))
    assert cache.lengths.tolist() == [6 + 5, 8 + 5]  # the last token is never fed back
    torch.manual_seed(0)
    sampled = generate(kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32), "kvpack",
                       do_sample=True, top_k=20)
    torch.manual_seed(0)
    assert torch.equal(sampled, generate(FakeQuantCache(model.config), "sdpa", do_sample=True, top_k=20))
    beams = generate(kh.KVPackCache(model.config, 4, 16, device="cpu", dtype=torch.float32), "kvpack",
                     do_sample=False, num_beams=2)
    assert torch.equal(beams, generate(FakeQuantCache(model.config), "sdpa", do_sample=False, num_beams=2))
    with pytest.raises(ValueError, match="make it with batch_size=4"):
        generate(kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32), "kvpack", num_beams=2)


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_with_a_chunked_prefill(bits, monkeypatch):
    """generate(prefill_chunk_size=4) of a left-padded batch (one sequence's padding outlasts the
    first chunk): the chunks after the first take the multi-token path, and the tokens are those of
    the reference cache under "sdpa"."""
    calls = []
    extend = kh.KVPackLayer._extend
    monkeypatch.setattr(kh.KVPackLayer, "_extend", lambda self, *a: calls.append(1) or extend(self, *a))
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0

    def generate(cache, attn):
        model.set_attn_implementation(attn)
        return model.generate(input_ids=ids * mask, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              prefill_chunk_size=4, **{CACHE: cache})

    got = generate(kh.KVPackCache(model.config, 2, 32, device="cpu", dtype=torch.float32, bits=bits), "kvpack")
    assert calls
    assert torch.equal(got, generate(FakeQuantCache(model.config, bits=bits), "sdpa"))


def test_assisted_generation_verifies_drafts_over_the_cache(monkeypatch):
    """generate(assistant_model=...): the drafts are verified as several new tokens over the cache (the
    multi-token path) and rejected ones cropped; the tokens are those of the same model and assistant
    over the reference cache under "sdpa", and the cache ends holding every token but the last."""
    calls = {"_extend": 0, "crop": 0}

    def counting(name):
        f = getattr(kh.KVPackLayer, name)

        def counted(self, *a, **kw):
            calls[name] += 1
            return f(self, *a, **kw)
        return counted

    for name in calls:
        monkeypatch.setattr(kh.KVPackLayer, name, counting(name))
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1, layers=1)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))

    def generate(cache, attn):
        model.set_attn_implementation(attn)
        return model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, assistant_model=assistant,
                              **{CACHE: cache})

    cache = kh.KVPackCache(model.config, 1, 64, device="cpu", dtype=torch.float32)
    got = generate(cache, "kvpack")
    assert torch.equal(got, generate(FakeQuantCache(model.config), "sdpa"))
    assert cache.lengths.tolist() == [got.shape[1] - 1]
    assert calls["_extend"] > 0 and calls["crop"] > 0, calls


def test_reorder_cache_permutes_rows_scales_and_lengths():
    model = tiny_model("llama")
    cache = kh.KVPackCache(model.config, 3, 8, device="cpu", dtype=torch.float32)
    layer = cache.layers[0]
    k = torch.randn(3, 2, 5, 64)
    layer.write(k, -k)
    layer.kv.append(torch.randn(3, 2, 2, 64), torch.randn(3, 2, 2, 64), counts=[0, 2, 1])
    before = [t.clone() for t in (layer.kv.k_cache, layer.kv.k_scales, layer.kv.device_lengths)]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for old, new in zip(before, (layer.kv.k_cache, layer.kv.k_scales, layer.kv.device_lengths)):
        assert torch.equal(new, old[[2, 2, 0]])
    assert layer.kv.lengths.tolist() == [6, 6, 5]
    # channel scales: a sequence's calibration follows its rows
    cache = kh.KVPackCache(model.config, 3, 8, granularity="channel", device="cpu", dtype=torch.float32)
    kv = cache.layers[0].kv
    kv.append(k, -k, counts=[5, 0, 3])
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    assert kv._calibrated == [False, True, True] and kv.lengths.tolist() == [0, 5, 5]


def test_builds_where_transformers_cache_has_a_read_only_max_cache_len(monkeypatch):
    """transformers 5.17 (the GPU image's) defines ``Cache.max_cache_len`` as a read-only, deprecated
    property; 5.25 has none. The cache must build and report its own length under either: here the
    5.17 property is put back on whichever Cache is installed."""
    from transformers.cache_utils import Cache
    monkeypatch.setattr(Cache, "max_cache_len", property(lambda self: -1), raising=False)
    cache = kh.KVPackCache(tiny_config(), 2, 24, device="cpu", dtype=torch.float32)
    assert cache.max_cache_len == 24 and all(layer.max_cache_len == 24 for layer in cache.layers)
    assert "max_cache_len=24" in repr(cache)


def test_bad_inputs_fail_clearly_and_write_nothing():
    with pytest.raises(ValueError, match="head_dim = 32 is not supported"):
        kh.KVPackCache(tiny_config(head_dim=32), 1, 8, device="cpu")
    with pytest.raises(ValueError, match="sliding_window = 16"):
        kh.KVPackCache(transformers.MistralConfig(**{**tiny_config().to_dict(), "sliding_window": 16}), 1, 8,
                       device="cpu")
    with pytest.raises(ValueError, match="granularity must be one of"):
        kh.KVPackCache(tiny_config(), 1, 8, granularity="tensor", device="cpu")
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        kh.KVPackCache(tiny_config(), 1, 0, device="cpu")
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 6))
    cache = kh.KVPackCache(model.config, 1, 8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE: cache})
        with pytest.raises(ValueError, match="would pass max_cache_len = 8. Nothing was written"):
            model(input_ids=ids[:, :3], **{CACHE: cache})
    assert cache.lengths.tolist() == [6] and all(layer.seen == 6 for layer in cache.layers)
    with pytest.raises(ValueError, match="would pass max_cache_len"):
        model.generate(input_ids=ids, max_new_tokens=4, **{CACHE: kh.KVPackCache(model.config, 1, 8, device="cpu",
                                                                                 dtype=torch.float32)})
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='kvpack'"), torch.no_grad():
        model(input_ids=ids, **{CACHE: kh.KVPackCache(model.config, 1, 8, device="cpu", dtype=torch.float32)})
    model.set_attn_implementation("kvpack")
    with pytest.raises(TypeError, match="make it with dtype=torch.float32"), torch.no_grad():
        model(input_ids=ids, **{CACHE: kh.KVPackCache(model.config, 1, 8, device="cpu", dtype=torch.bfloat16)})


def test_kvpack_backend_is_sdpa_without_a_kvpack_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    steps = torch.randint(1, VOCAB, (2, 3))
    got = teacher_forced(model, DynamicCache(config=model.config), ids, steps, "kvpack", attention_mask=mask)
    want = teacher_forced(model, DynamicCache(config=model.config), ids, steps, "sdpa", attention_mask=mask)
    assert torch.equal(got, want)


def test_compiled_decode_step_matches_eager_without_recompiles():
    """The decode step traces whole (fullgraph) and a second, third step reuse the graph: no guard on
    a count that changes every step. Inductor writes the cache in place (no copy of it)."""
    model = tiny_model("llama", layers=1)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    steps = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(7))
    eager = teacher_forced(model, kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32), ids,
                           steps, "kvpack")
    cache = kh.KVPackCache(model.config, 2, 16, device="cpu", dtype=torch.float32)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    fwd = torch.compile(model.forward, fullgraph=True)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE: cache})
        logits = []
        for s in range(3):
            pos = torch.full((2, 1), 6 + s)
            logits.append(fwd(input_ids=steps[:, s:s + 1], position_ids=pos, **{CACHE: cache}).logits[:, -1])
    assert counters["stats"]["unique_graphs"] == 1
    assert rel_err(torch.stack(logits, 1), eager[:, 1:]) <= FP32_REL
    assert cache.layers[0].stale
    assert cache.lengths.tolist() == [6, 6]  # the host count lags the compiled steps until sync()
    cache.sync()
    assert cache.lengths.tolist() == [9, 9] and cache.layers[0].seen == 9


# --- GPU ------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("granularity,dtype,bits", [("token", torch.float16, 8), ("channel", torch.bfloat16, 4)])
def test_gpu_chunked_prefill_of_a_left_padded_batch(granularity, dtype, bits):
    """On the GPU, the multi-token path (the cache dequantized, the masks and one SDPA on the device)
    and the fused decode steps after it give the CPU's fp32 logits of the same model and cache within
    the 16-bit rounding budget of the test above; the padding is never written."""
    ids, mask, steps, real = padded_chunks_batch(seed=7)
    model = tiny_model("llama")  # fp32 weights, then the same weights in 16 bits on the GPU
    want = chunked_logits(model, kh.KVPackCache(model.config, 3, 32, granularity=granularity, device="cpu",
                                                dtype=torch.float32, bits=bits), "kvpack", ids, mask, steps)
    model = model.to(device="cuda", dtype=dtype)
    cache = kh.KVPackCache(model.config, 3, 32, granularity=granularity, device="cuda", dtype=dtype, bits=bits)
    got = chunked_logits(model, cache, "kvpack", ids.cuda(), mask.cuda(), steps.cuda()).float().cpu()
    assert float((got[real] - want[real]).abs().max()) <= 0.05 * float(want[real].abs().max())
    cache.sync()
    assert cache.lengths.tolist() == [12 + 3, 6 + 3, 11 + 3]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("granularity,dtype,bits", [("token", torch.float16, 8), ("channel", torch.bfloat16, 8),
                                                    ("token", torch.float16, 4), ("channel", torch.bfloat16, 4)])
def test_gpu_generate_eager_graph_and_compiled(granularity, dtype, bits):
    """On the GPU: generate() with a KVPackCache, eager and compiled (transformers compiles the decode
    step by itself: reduce-overhead, CUDA graphs), and a hand-captured CUDA graph of a decode step,
    all giving the eager step's logits (same kernels; the graph replays them)."""
    model = tiny_model("llama", dtype=dtype, device="cuda")
    ids = torch.randint(1, VOCAB, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def gen(**kw):
        cache = kh.KVPackCache(model.config, 2, 64, granularity=granularity, device="cuda", dtype=dtype, bits=bits)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **{CACHE: cache}, **kw)
        return out, cache

    eager, cache_e = gen(disable_compile=True)
    compiled, cache_c = gen()
    tol = 0.05 * float(torch.stack(eager.logits).abs().max())
    # Compiled matmuls may round differently (a small budget per step). Where two logits of a step are
    # that close, greedy decoding may pick the other token; from there the two runs decode different
    # texts, so the comparison ends at the first such step, and only a near tie may cause it.
    for i, (a, b) in enumerate(zip(eager.logits, compiled.logits)):
        assert float((a - b).abs().max()) <= tol, f"decode step {i}"
        flipped = eager.sequences[:, 16 + i] != compiled.sequences[:, 16 + i]
        if flipped.any():
            top2 = a.float().topk(2, dim=-1).values
            assert bool(((top2[:, 0] - top2[:, 1]) <= 2 * tol)[flipped].all()), f"step {i}: not a near tie"
            break
    cache_c.sync()
    assert cache_c.lengths.tolist() == cache_e.lengths.tolist() == [16 + 11, 11 + 11]

    # a hand-captured decode step: a replay equals the eager step
    cache = kh.KVPackCache(model.config, 2, 64, granularity=granularity, device="cuda", dtype=dtype, bits=bits)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{CACHE: cache})
        tok = torch.randint(1, VOCAB, (2, 1), device="cuda")
        pos = torch.tensor([[16], [11]], device="cuda")
        static = {"input_ids": tok, "position_ids": pos}
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (a step, then undone)
            model(**static, **{CACHE: cache})
            cache.crop(-1)
        torch.cuda.current_stream().wait_stream(s)
        eager_step = model(**static, **{CACHE: cache}).logits
        cache.crop(-1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records the step; the kernels run on replay
            out = model(**static, **{CACHE: cache}).logits
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager_step)
        cache.sync()  # the host's counts follow the device after replays
        assert cache.lengths.tolist() == [17, 12]


@pytest.mark.gpu
@cuda
def test_gpu_decode_step_never_syncs():
    """The cache's update and the "kvpack" backend of a decode step queue kernels only."""
    model = tiny_model("llama", dtype=torch.float16, device="cuda")
    cache = kh.KVPackCache(model.config, 2, 32, device="cuda", dtype=torch.float16)
    ids = torch.randint(1, VOCAB, (2, 8), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, **{CACHE: cache})
    attn = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 1, 64, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kk, vv = cache.update(k, k, 0)
        out, _ = kh.kvpack_attention_forward(attn, q, kk, vv, None, scaling=0.125)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (2, 1, 4, 64)
    assert cache.layers[0].kv.lengths.tolist() == [9, 9]
