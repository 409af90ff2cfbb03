"""kvpack inside Hugging Face transformers: an INT8 cache and the attention backend that reads it.

    import kvpack.hf                       # registers attn_implementation="kvpack"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float16, attn_implementation="kvpack")
    cache = kvpack.hf.KVPackCache(model.config, batch_size=8, max_cache_len=32768)
    out = model.generate(**inputs, cache=cache, max_new_tokens=256)   # past_key_values= before transformers 5.2x

``import kvpack`` never imports transformers; this module does (the ``.[hf]`` extra; tested with the
release constraints.txt pins).

What runs where:

* ``KVPackCache`` holds one ``kvpack.KVCache`` per layer: int8 K and V ``[B, Hkv, max_cache_len, D]``
  with per-token (default) or per-channel scales, preallocated like transformers' ``StaticCache``.
  Its ``update`` only hands the new rows to the attention backend of the same layer; the backend
  writes them (quantized on write, one launch) and attends. It has to be the backend that writes:
  only it is given the attention mask, which says which rows of a left-padded batch are padding
  (pads are never written, so never attended).
* A **decode step** (one new token per sequence): the new token is appended, then kvpack's fused
  kernel attends over the int8 cache (``kvpack.decode_attention``). No host synchronisation, no
  allocation that depends on data, shapes fixed by the cache: the step can run as a CUDA graph,
  captured by hand (``torch.cuda.graph``) or by ``torch.compile(mode="reduce-overhead")``, which
  ``generate()`` applies by itself on a GPU (the cache is compileable, like ``StaticCache``).
* A **prefill** (several tokens over an empty cache): attention over the prompt's own K/V with
  transformers' SDPA backend, exactly as ``attn_implementation="sdpa"`` computes it; its real rows
  are then written quantized (left padding dropped). Channel scales are calibrated here.
* **Several tokens over a non-empty cache** (chunked prefill, assisted generation): correct, and
  slower: each sequence's cached rows are dequantized and SDPA attends over them and the new rows,
  one sequence at a time (a pass over the cache per layer, as transformers' ``QuantizedCache`` makes
  on every step).
* With any other cache (``DynamicCache``, ``StaticCache``, none), ``"kvpack"`` is exactly ``"sdpa"``.

``max_cache_len`` bounds the positions a batch takes (its longest prompt, padding included, plus the
new tokens), as for ``StaticCache``. A step that would pass it raises before anything is written:
in eager steps from the host's count; under a CUDA graph (compiled ``generate()``) from the check
``generate()`` makes on the host before each step (``get_mask_sizes``), which reads the device's
count once (``generate()`` waits for each step anyway). A replayed graph never writes or reads past
the cache: the write kernel clamps.

Families: Llama, Mistral, Qwen2, Qwen3 and any model whose attention calls the cache's ``update``
and then the registered attention function (GQA, MQA and MHA; RoPE is applied before the cache).
Head dims 64, 128, 256. Sliding-window layers and logit soft-capping are refused with a clear error.
Beam search works (``reorder_cache`` permutes the int8 rows and scales).
"""

from __future__ import annotations

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only where transformers is missing
    raise ImportError(
        "kvpack.hf needs Hugging Face transformers 5.x: pip install -e '.[hf]' (or pip install transformers). "
        "`import kvpack` alone needs torch only."
    ) from e

from .cache import KVCache
from .decode_attention import HEAD_DIMS, check_granularity, decode_attention

ATTN_IMPLEMENTATION = "kvpack"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# --- the model's config -----------------------------------------------------------------------------

def model_shape(config) -> dict:
    """Layers, query heads, KV heads and head_dim of a transformers config (its text part), checked
    against what the kernels take; raises ValueError naming the model's value otherwise."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    q_heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // q_heads
    name = getattr(text, "model_type", type(text).__name__)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{name}: head_dim = {head_dim} is not supported by kvpack's kernels, which take head_dim "
                         f"in {HEAD_DIMS}; use attn_implementation='sdpa' with a transformers cache for this model")
    if q_heads % kv_heads:
        raise ValueError(f"{name}: {q_heads} query heads are not a multiple of {kv_heads} KV heads")
    types = getattr(text, "layer_types", None)
    windowed = [i for i, t in enumerate(types or []) if t != "full_attention"]
    if types is None and getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        windowed = list(range(layers))
    if windowed:
        raise ValueError(f"{name}: layers {windowed[:4]}{'...' if len(windowed) > 4 else ''} use "
                         f"{(types or ['sliding_attention'] * layers)[windowed[0]]} (sliding_window = "
                         f"{getattr(text, 'sliding_window', None)}); kvpack's cache keeps every token and its kernel "
                         "attends over all of them, so it does not run windowed layers. Set sliding_window=None if "
                         "the model does not need it")
    if getattr(text, "attn_logit_softcapping", None):
        raise ValueError(f"{name}: attention logit soft-capping (attn_logit_softcapping = "
                         f"{text.attn_logit_softcapping}) is not supported by kvpack's kernel")
    return {"layers": layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": int(head_dim),
            "model_type": name}


# --- one layer --------------------------------------------------------------------------------------

# The multi-token path (KVPackLayer._extend) dequantizes the cached rows of at most this many bytes
# of fp32 K and V at a time: the whole batch where the cache is small, a few sequences a call where
# it is large (a sequence of 8 KV heads at 32768 tokens, D = 128, takes 256 MiB: 4 a call).
EXTEND_SCRATCH_BYTES = 1 << 30


class KVPackLayer(CacheLayerMixin):
    """One layer's INT8 cache (a ``kvpack.KVCache``) as a transformers cache layer.

    ``cumulative_length`` (device) and ``seen`` (host) count the positions the batch has taken,
    padding included (transformers' notion, what ``max_cache_len`` bounds); ``kv.lengths`` count
    each sequence's real tokens (what the kernel attends over)."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, layer_idx: int, batch_size: int, kv_heads: int, head_dim: int, max_cache_len: int, *,
                 granularity: str, device, dtype, bits: int = 8, group_size: int = 32):
        super().__init__()
        self.layer_idx = layer_idx
        self.kv = KVCache(batch_size, kv_heads, head_dim, max_cache_len, granularity=granularity, device=device,
                          dtype=dtype, bits=bits, group_size=group_size)
        self.device = self.kv.device
        self.dtype = dtype
        self.batch_size, self.num_heads, self.head_dim = batch_size, kv_heads, head_dim
        self.max_cache_len = max_cache_len
        self.keys, self.values = self.kv.k_cache, self.kv.v_cache  # int8: what the layer holds
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0
        self.stale = False  # set by steps that ran inside a compiled graph: the host counts lag the device
        self.is_initialized = True
        for t in (self.kv.k_cache, self.kv.v_cache, self.kv.k_scales, self.kv.v_scales, self.kv.device_lengths,
                  self.kv._arrivals, self.kv.saturated, self.cumulative_length):
            torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs replay over them

    # transformers' layer interface --------------------------------------------------------------

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated in __init__
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # KVPackCache.update is the entry point; kept for the interface

    def sync(self) -> None:
        """Bring the host counts in step with the device (one synchronisation), after graph replays."""
        self.kv.sync_lengths()
        self.seen = int(self.cumulative_length)
        self.stale = False

    def get_seq_length(self):
        if _compiling():
            return self.cumulative_length  # a tensor, as StaticLayer returns: no guard on a changing int
        if self.stale:
            self.sync()
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds for this step: the new rows only (the
        backend attends over the cached rows without a mask). Also the host-side check of a step that
        would pass max_cache_len, before anything is written."""
        if _compiling():
            return query_length, 0
        self.check_room(query_length)
        return query_length, self.seen

    def check_room(self, new: int) -> None:
        if self.stale:
            self.sync()
        if self.seen + new > self.max_cache_len:
            raise ValueError(
                f"KVPackCache holds {self.seen} positions per sequence (padding included); {new} more would pass "
                f"max_cache_len = {self.max_cache_len}. Nothing was written; make the cache with a larger max_cache_len "
                "(the longest prompt plus max_new_tokens)")

    def reset(self) -> None:
        self.kv.reset()
        self.cumulative_length.zero_()
        self.seen = 0
        self.stale = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (a positive value: keep that many, the older
        spelling). Every dropped position must be a real token of every sequence (generated tokens are)."""
        if self.stale:
            self.sync()
        drop = -tokens_to_remove if tokens_to_remove <= 0 else max(self.seen - tokens_to_remove, 0)
        if drop == 0:
            return
        if drop > min(self.kv._host_lengths):
            raise ValueError(f"cannot crop {drop} tokens: a sequence holds only {min(self.kv._host_lengths)}")
        self.kv._host_lengths = [n - drop for n in self.kv._host_lengths]
        self.kv.device_lengths.sub_(drop)
        self.cumulative_length.sub_(drop)
        self.seen -= drop

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b takes the rows, scales and length of sequence beam_idx[b]."""
        idx = beam_idx.to(self.device)
        for t in (self.kv.k_cache, self.kv.v_cache, self.kv.k_scales, self.kv.v_scales, self.kv.device_lengths):
            t.copy_(t.index_select(0, idx))
        host = beam_idx.tolist()
        self.kv._host_lengths = [self.kv._host_lengths[i] for i in host]
        self.kv._calibrated = [self.kv._calibrated[i] for i in host]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KVPackCache is preallocated for batch_size sequences; make it with "
                                  "batch_size = batch * num_beams (or num_return_sequences) instead")

    batch_select_indices = batch_repeat_interleave

    # what the "kvpack" backend calls -------------------------------------------------------------

    def attend(self, module, query, key, value, attention_mask, scaling, dropout, kwargs):
        """Write this step's rows and attend: ``[B, q_len, Hq, D]`` (transformers' layout)."""
        q_len, d = query.shape[2], query.shape[3]
        if query.dtype != self.dtype:
            raise TypeError(f"the model computes in {query.dtype} but KVPackCache was made for {self.dtype}; "
                            f"make it with dtype={query.dtype}")
        if scaling is None:
            scaling = d**-0.5
        if q_len == 1:
            return self._decode(query, key, value, scaling), None
        if self.stale:
            self.sync()
        if max(self.kv._host_lengths) == 0:
            out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)[0]
            self.write(key, value, attention_mask)
            return out, None
        return self._extend(module, query, key, value, attention_mask, scaling), None

    def _decode(self, query, key, value, scaling):
        b, hq, _, d = query.shape
        if _compiling():
            self.stale = True
            torch.ops.kvpack.kv_append.default(
                self.kv.k_cache, self.kv.v_cache, self.kv.k_scales, self.kv.v_scales, self.kv.device_lengths,
                self.kv._arrivals, self.kv.saturated, key, value, None, self.kv.granularity)
        else:
            self.kv.append(key, value)
            self.seen += 1
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                self.stale = True  # the replays advance the device counts only
        self.cumulative_length.add_(1)
        out = decode_attention(query.reshape(b, hq, d), self.kv.k_cache, self.kv.v_cache, self.kv.k_scales,
                               self.kv.v_scales, self.kv.device_lengths, granularity=self.kv.granularity,
                               sm_scale=float(scaling), check_lengths=False, bits=self.kv.bits,
                               group_size=self.kv.group_size or 32)
        return out.view(b, 1, hq, d)

    def write(self, key, value, attention_mask=None) -> None:
        """Quantize this step's real rows into the cache (the padding of a left-padded batch dropped).

        key, value ``[B, Hkv, t, D]``; ``attention_mask`` the 4D mask of the step (None: every row is
        real). One host synchronisation when the mask holds padding (the counts the host checks)."""
        t = key.shape[2]
        real = real_rows(attention_mask, t)
        if real is None:
            counts = None
        else:
            counts = real.sum(-1).tolist()
            if all(c == t for c in counts):
                counts = None
            else:  # the real rows first, in order (a stable sort of the padding flags)
                order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
                index = order[:, None, :, None].expand(key.shape)
                key, value = key.gather(2, index), value.gather(2, index)
        self.kv.append(key, value, counts=counts)
        self.cumulative_length.add_(t)
        self.seen += t

    def _extend(self, module, query, key, value, attention_mask, scaling):
        """Several new tokens over a non-empty cache (chunked prefill, assisted generation): SDPA over
        the dequantized cached rows (those below each sequence's length visible) and the step's real
        new rows (causal), one call for as many sequences as EXTEND_SCRATCH_BYTES of fp32 scratch
        hold (the whole batch but at the largest caches), then the new rows are written. No host
        synchronisation but write()'s (with padding); a padding row's output is zero."""
        b, hq, t, d = query.shape
        kv = self.kv
        hkv = kv.kv_heads
        group = hq // hkv
        n = max(kv._host_lengths)
        dev = query.device
        past = torch.arange(n, device=dev) < kv.device_lengths[:, None]  # [B, n]
        new = torch.ones(t, t, dtype=torch.bool, device=dev).tril()  # [t, t]: row r sees new rows <= r
        real = real_rows(attention_mask, t)
        if real is not None:  # only real rows are seen; a padding row sees itself (no empty row), then 0
            new = (new & real[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)
        visible = torch.cat([past[:, None, :].expand(b, t, n), new.expand(b, t, t)], 2)  # [B, t, n + t]
        # grouped-query attention as more query rows over each KV head: query head h reads KV head
        # h // group (transformers' repeat_kv), so K and V are never repeated
        q = query.reshape(b, hkv, group * t, d)
        mask = visible[:, None, None].expand(b, 1, group, t, n + t).reshape(b, 1, group * t, n + t)
        step = max(1, EXTEND_SCRATCH_BYTES // max(1, 2 * 4 * hkv * n * d))  # sequences a call: K and V in fp32
        parts = []
        for s in range(0, b, step):
            rows = slice(s, s + step)
            past_k, past_v = kv.dequantize(n, query.dtype, sequences=rows)
            keys, values = torch.cat([past_k, key[rows]], 2), torch.cat([past_v, value[rows]], 2)  # [., Hkv, n + t, D]
            parts.append(torch.nn.functional.scaled_dot_product_attention(q[rows], keys, values, attn_mask=mask[rows],
                                                                          scale=scaling))
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(b, hq, t, d)
        if real is not None:
            out = out.masked_fill(~real[:, None, :, None], 0.0)
        self.write(key, value, attention_mask)
        return out.transpose(1, 2).contiguous()


def real_rows(attention_mask, t: int):
    """Which of a step's ``t`` new rows are real (not padding), bool ``[B, t]``, from the step's 4D
    mask: the last query row sees every real key of the step (causal + padding masks), whichever side
    the padding is on. None: no mask, every row is real."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, -t:]
    if last.dtype == torch.bool:
        return last
    return last > torch.finfo(last.dtype).min / 2  # an additive float mask: 0 where attended


# --- the cache --------------------------------------------------------------------------------------

class _Pending:
    """The layer whose ``update`` ran last and whose attention has not run yet: what the "kvpack"
    backend writes into. A model's attention calls ``cache.update`` and then the backend, for one
    layer at a time."""

    layer: KVPackLayer | None = None


_PENDING = _Pending()


class KVPackCache(Cache):
    """kvpack's INT8 KV cache for a transformers model: one ``kvpack.KVCache`` per layer.

    ``config``: the model's config (its text part is read: layers, heads, head_dim).
    ``batch_size``: sequences per ``generate()`` call (times num_beams for beam search).
    ``max_cache_len``: positions per sequence, the longest prompt (padding included) plus the new tokens.
    ``granularity``: "token" (a scale per token row, computed on write) or "channel" (the paper's: a
    scale per channel, calibrated on the prefill; later values beyond it saturate, see ``saturated``).
    ``device``, ``dtype``: the model's (fp16 or bf16 on CUDA; fp32 too on the CPU).
    ``bits``: 8, or 4 (packed nibbles, a scale per ``group_size`` channels of a token; keys per
    channel with granularity "channel"; on CUDA the INT4 kernels of kernels/decode_int4.cu: docs/int4.md).
    """

    def __init__(self, config, batch_size: int, max_cache_len: int, *, granularity: str = "token",
                 device="cuda", dtype=torch.float16, bits: int = 8, group_size: int = 32):
        check_granularity(granularity)
        shape = model_shape(config)
        for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.shape = shape
        self.granularity = granularity
        self.dtype = dtype
        self.bits = bits
        layers = [KVPackLayer(i, batch_size, shape["kv_heads"], shape["head_dim"], max_cache_len,
                              granularity=granularity, device=device, dtype=dtype, bits=bits, group_size=group_size)
                  for i in range(shape["layers"])]
        super().__init__(layers=layers)
        self.device = layers[0].device

    @property
    def max_cache_len(self) -> int:
        """Positions per sequence, every layer's. (A property of our own: transformers 5.17 still defines
        a read-only, deprecated ``Cache.max_cache_len``, which an instance attribute cannot replace.)"""
        return self.layers[0].max_cache_len

    def __repr__(self) -> str:
        return (f"KVPackCache(layers={len(self.layers)}, batch_size={self.batch_size}, kv_heads={self.shape['kv_heads']}, "
                f"head_dim={self.shape['head_dim']}, max_cache_len={self.max_cache_len}, granularity="
                f"{self.granularity!r}, bits={self.bits}, device={str(self.device)!r}, nbytes={self.nbytes})")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hand this layer's new rows to the "kvpack" attention backend, which writes and attends.
        Returns them unchanged (the prefill attends over exactly these)."""
        layer = self.layers[layer_idx]
        if _PENDING.layer is not None:
            stale = _PENDING.layer
            _PENDING.layer = None
            raise RuntimeError(
                f"layer {stale.layer_idx} of a KVPackCache was updated but its attention did not read the cache: "
                "the model must run with attn_implementation='kvpack' (import kvpack.hf, then load it with "
                "attn_implementation='kvpack' or call model.set_attn_implementation('kvpack'))")
        b, h, t, d = key_states.shape
        if (b, h, d) != (layer.batch_size, layer.num_heads, layer.head_dim):
            raise ValueError(
                f"the model passes keys [B={b}, Hkv={h}, t, D={d}] but this KVPackCache was made for batch_size="
                f"{layer.batch_size}, {layer.num_heads} KV heads, head_dim {layer.head_dim}; make it with "
                f"batch_size={b} (beam search and num_return_sequences multiply the batch)")
        if not _compiling():
            layer.check_room(t)
        _PENDING.layer = layer
        return key_states, value_states

    # what transformers asks of a cache --------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds on its device: K and V (int8 or packed int4) and their fp32 scales, every layer."""
        return sum(layer.kv.nbytes for layer in self.layers)

    @property
    def lengths(self) -> torch.Tensor:
        """Real tokens held per sequence (host copy, int32 [B]); after graph replays call ``sync()`` first."""
        return self.layers[0].kv.lengths

    @property
    def saturated(self) -> torch.Tensor:
        """Channel granularity: values clipped at +-127 by the prefill's scales, summed over layers (device)."""
        return sum(layer.kv.saturated for layer in self.layers)

    def sync(self) -> None:
        """Bring the host counts in step with the device (one synchronisation), after replaying a
        captured step (the replays advance the device counts only)."""
        for layer in self.layers:
            layer.sync()


def kvpack_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """The "kvpack" attention backend: over a ``KVPackCache``, writes the step's rows and attends with
    kvpack's kernels; with any other cache (or none), exactly transformers' "sdpa"."""
    layer = _PENDING.layer
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _PENDING.layer = None
    if getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
        raise RuntimeError(f"the cache was updated for layer {layer.layer_idx} but attention runs for layer "
                           f"{module.layer_idx}")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {layer.layer_idx} uses a sliding window ({kwargs['sliding_window']}); kvpack's cache "
                         "attends over every token")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by kvpack's kernel")
    if dropout:
        raise ValueError("kvpack attention is for inference: dropout must be 0 (call model.eval())")
    return layer.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)


def kvpack_mask(*args, **kwargs):
    """The masks of the "kvpack" backend: transformers' SDPA mask, except for a decode step over a
    KVPackCache (one new row, sized by its get_mask_sizes to itself), which needs none: the kernel
    reads each sequence's length."""
    if kwargs.get("q_length") == 1 and kwargs.get("kv_length") == 1:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the "kvpack" attention backend and its mask with transformers (done on import)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvpack_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvpack_mask)


def cache_kwarg() -> str:
    """The keyword under which this transformers release passes a cache to ``generate()`` and
    ``forward()``: ``cache`` from 5.2x on, ``past_key_values`` before."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


register()

__all__ = ["ATTN_IMPLEMENTATION", "KVPackCache", "KVPackLayer", "cache_kwarg", "kvpack_attention_forward",
           "kvpack_mask", "model_shape", "real_rows", "register"]
TRANSFORMERS_VERSION = transformers.__version__
