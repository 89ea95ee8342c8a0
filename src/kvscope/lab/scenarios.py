"""The lab's scenarios: each condition planted by real code in a twin, and each healthy control.

A scenario is a function `(model, settings, recording) -> notes` that generates inside the
recording; `SCENARIOS` lists them with the detectors that must flag each (`kvscope.lab` says what
each one plants). `kvscope.lab.runner` records and labels them.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

LAB_VOCAB = 32000  # larger than the shrunk twins' 512: kept logits weigh what real ones do (128 KiB a step)


@dataclass
class LabSettings:
    """How big each scenario is: prompts, new tokens, generations, the twin and its layers."""

    device: str = "cpu"
    twin: str = "gpt-oss-20b"
    dtype: str = "bfloat16"
    layers: int | None = None  # fewer layers than the twin's (CPU tests); None keeps the geometry
    prompt_tokens: tuple[int, ...] = (48, 80, 112)
    new_tokens: int = 96
    writer: str = "thread"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Scenario:
    name: str
    planted: bool
    expected: tuple[str, ...]  # detectors that must warn (warning/critical); empty for a control
    description: str
    run: Callable[[Any, LabSettings, Any], dict[str, Any] | None]  # (model, settings, lab context) -> notes
    needs_cuda: bool = False
    cpu_detectable: bool = False  # the condition shows without allocator readings (layers, head stats)
    head_stats_every: int = 0
    attn_implementation: str | None = None


def _twin(settings: LabSettings) -> Any:
    from kvscope.twins import load_twin, shrink_config
    from kvscope.twins.spec import TwinSpec

    spec = shrink_config(load_twin(settings.twin))
    cfg = dict(spec.config)
    cfg["vocab_size"] = LAB_VOCAB
    if "vocab_size_per_layer_input" in cfg:  # Gemma 3n/4's per-layer embeddings read the same ids
        cfg["vocab_size_per_layer_input"] = LAB_VOCAB
    if settings.layers is not None:
        cfg["num_hidden_layers"] = settings.layers
        types = cfg.get("layer_types")
        if isinstance(types, list):
            cut = types[: settings.layers]
            if types[-1] == "full_attention":  # Gemma 3/4 force their last layer to full attention: say so
                cut[-1] = "full_attention"
            cfg["layer_types"] = cut
        if cfg.get("num_kv_shared_layers"):
            cfg["num_kv_shared_layers"] = _shared_layers_kept(cfg)
    return TwinSpec(spec.name, spec.source, spec.dtype, cfg, spec.notes, shrunk=True)


def _shared_layers_kept(cfg: dict[str, Any]) -> int:
    """KV-shared layers (Gemma 3n/4: the last N reuse an earlier layer's cache of their type) left
    in a twin cut to fewer layers: the layers before them must still hold every type they use."""
    types = cfg.get("layer_types") or []
    first_all = next((k for k in range(1, len(types) + 1) if set(types[:k]) == set(types)), len(types))
    return max(0, min(int(cfg["num_kv_shared_layers"]), cfg["num_hidden_layers"] - first_all))


def build_model(settings: LabSettings, attn_implementation: str | None = None) -> Any:
    from kvscope.twins.build import build_twin

    return build_twin(_twin(settings), dtype=settings.dtype, device=settings.device,
                      attn_implementation=attn_implementation)


def _ids(model: Any, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(3, vocab, (1, tokens), generator=g).to(model.device)


def _cache_keyword() -> str:
    """generate's name for a cache passed in: `cache` from transformers 5.24, else `past_key_values`."""
    from kvscope.twins.build import transformers_at_least

    return "cache" if transformers_at_least(5, 24) else "past_key_values"


def _generate(model: Any, ids: torch.Tensor, settings: LabSettings, **kwargs: Any) -> Any:
    new = kwargs.pop("max_new_tokens", settings.new_tokens)
    if "past_key_values" in kwargs:
        kwargs[_cache_keyword()] = kwargs.pop("past_key_values")
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, **kwargs)


def _plain(rec: Any, model: Any, settings: LabSettings, keep: list[Any] | None = None,
           settle: bool = True, **kwargs: Any) -> None:
    """One generation per prompt length; outputs dropped (or kept in `keep`) before settle()."""
    for i, tokens in enumerate(settings.prompt_tokens):
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), settings, **kwargs)
        if keep is not None:
            keep.append(out)
        del out
        if settle:
            rec.settle()


# -- planted conditions ---------------------------------------------------------------------

def _kept_caches(model: Any, s: LabSettings, rec: Any) -> None:
    kept: list[Any] = []
    for i, tokens in enumerate(s.prompt_tokens):
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), s, return_dict_in_generate=True)
        kept.append(out.past_key_values)  # one cache per request, never dropped
        del out
        rec.settle()


def _kept_scores(model: Any, s: LabSettings, rec: Any) -> None:
    kept: list[Any] = []
    for i, tokens in enumerate(s.prompt_tokens):
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), s, return_dict_in_generate=True, output_scores=True,
                        output_logits=True)
        kept.append((out.scores, out.logits))
        del out
        rec.settle()


def _scores_dropped(model: Any, s: LabSettings, rec: Any) -> None:
    _plain(rec, model, s, return_dict_in_generate=True, output_scores=True, output_logits=True)


def _kept_attentions(model: Any, s: LabSettings, rec: Any) -> None:
    _plain(rec, model, s, return_dict_in_generate=True, output_attentions=True)


class _KeepKeys:
    """A logits processor that keeps a copy of some layers' keys (and values) at every step.

    `layers` None: every layer the cache holds (a KV-sharing model such as Gemma 3n/4 caches fewer
    layers than it has, so the cache's own list is what "the whole cache" means)."""

    def __init__(self, cache: Any, layers: list[int] | None, values: bool) -> None:
        self.cache, self.layers, self.values, self.kept = cache, layers, values, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        held = self.cache.layers
        for i in range(len(held)) if self.layers is None else self.layers:
            layer = held[i] if i < len(held) else None
            if not isinstance(getattr(layer, "keys", None), torch.Tensor):
                continue  # not filled (a layer the model shares from another)
            self.kept.append(layer.keys.clone())
            if self.values:
                self.kept.append(layer.values.clone())
        return scores


def _with_processor(model: Any, s: LabSettings, rec: Any, make: Callable[[Any], Any]) -> None:
    from transformers import DynamicCache, LogitsProcessorList

    for i, tokens in enumerate(s.prompt_tokens):
        cache = DynamicCache(config=model.config)
        processor = make(cache)
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), s, past_key_values=cache,
                        logits_processor=LogitsProcessorList([processor]))
        del out, processor, cache
        rec.settle()


def _copied_keys(model: Any, s: LabSettings, rec: Any) -> None:
    full = [i for i, t in enumerate(_layer_types(model)) if t == "full_attention"][:4] or [0]
    _with_processor(model, s, rec, lambda cache: _KeepKeys(cache, full, values=False))


def _cache_copy(model: Any, s: LabSettings, rec: Any) -> None:
    _with_processor(model, s, rec, lambda cache: _KeepKeys(cache, None, values=True))


class _GrowingBuffer:
    """Allocates a buffer larger than any before at each step and frees the previous one: every
    freed block is too small for the next request, so the allocator keeps reserving new memory."""

    def __init__(self, device: torch.device, step_bytes: int) -> None:
        self.device, self.step_bytes, self.n, self.buffer = device, step_bytes, 0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.n += 1
        size = (1 << 20) + self.n * self.step_bytes
        fresh = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.buffer = fresh  # the previous buffer is freed here, after the larger one was allocated
        return scores


def _interleaved(model: Any, s: LabSettings, rec: Any) -> None:
    _with_processor(model, s, rec, lambda cache: _GrowingBuffer(model.device, 1 << 20))


OOM_BATCH, OOM_PROMPT = 32, 64  # the OOM scenario's batch: 32 sequences of 64 tokens


def oom_batch(model: Any) -> torch.Tensor:
    return _ids(model, OOM_PROMPT, 0).repeat(OOM_BATCH, 1)


def prefill_bytes(model: Any) -> int:
    """What the OOM batch's prefill allocates at its peak, measured by running it once (outside any
    recording): the cap leaves room for it, so the run runs out in the decode loop, not the prefill."""
    index = model.device.index if model.device.index is not None else torch.cuda.current_device()
    before = torch.cuda.memory_allocated(index)
    torch.cuda.reset_peak_memory_stats(index)
    with torch.no_grad():
        try:  # generate's prefill computes the last position's logits only
            out = model(oom_batch(model), use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep: all positions' logits, more room than needed
            out = model(oom_batch(model), use_cache=True)
    del out
    gc.collect()
    torch.cuda.empty_cache()
    return max(torch.cuda.max_memory_allocated(index) - before, 0)


def oom_under_fraction(model: Any, s: LabSettings, rec: Any, lab: dict[str, Any]) -> dict[str, Any]:
    notes: dict[str, Any] = {"limit_bytes": lab.get("limit_bytes"), "prefill_bytes": lab.get("prefill_bytes")}
    rec.next_prompt("lab-oom")
    try:  # a batch of 32 long sequences under the cap: the cache outgrows it
        out = _generate(model, oom_batch(model), s, max_new_tokens=2048)
        del out
        notes["oom"] = False
    except torch.cuda.OutOfMemoryError as exc:
        notes["oom"] = True
        notes["message"] = str(exc).splitlines()[0][:300]
    gc.collect()
    return notes


def _fits_under_fraction(model: Any, s: LabSettings, rec: Any) -> None:
    _plain(rec, model, s)


def _static(max_cache_len: Callable[[LabSettings, int], int], compile_on: bool = False) -> Callable[..., None]:
    def run(model: Any, s: LabSettings, rec: Any) -> None:
        from transformers import StaticCache

        for i, tokens in enumerate(s.prompt_tokens):
            cache = StaticCache(config=model.config, max_cache_len=max_cache_len(s, tokens))
            rec.next_prompt(f"lab-{tokens}")
            kwargs: dict[str, Any] = {"past_key_values": cache}
            if compile_on:
                kwargs["disable_compile"] = False
            out = _generate(model, _ids(model, tokens, i), s, **kwargs)
            # kwargs holds the cache too: a control that kept it would leak one cache per generation
            # (the H200 recording of 2026-12-01 did, see traces/lab/README.md)
            del out, cache, kwargs
            rec.settle()
    return run


def _store_in_float32(layer: Any) -> Any:
    """Make one cache layer store K/V in float32 (a subclass of its own class, so every reader
    still finds its `keys`/`values`) while handing the model its own dtype back."""
    base = type(layer)

    def update(self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys, values = base.update(self, key_states.float(), value_states.float(), *args, **kwargs)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    layer.__class__ = type(f"Float32{base.__name__}", (base,), {"update": update})
    return layer


def _layer_with_peers(model: Any) -> int:
    """The middle full-attention layer when there are at least three (layer_anomaly compares a
    layer with its peers of one type), else the middle layer of the largest type. Only layers that
    hold a cache of their own: Gemma 3n/4's last `num_kv_shared_layers` reuse an earlier one's and
    have no entry in the cache (gemma-4-e2b: 15 of 35 layers own one)."""
    count = model.config.num_hidden_layers - int(getattr(model.config, "num_kv_shared_layers", 0) or 0)
    types = (_layer_types(model) or ["full_attention"] * model.config.num_hidden_layers)[:count]
    groups: dict[str, list[int]] = {}
    for i, layer_type in enumerate(types):
        groups.setdefault(layer_type, []).append(i)
    full = groups.get("full_attention", [])
    layers = full if len(full) >= 3 else max(groups.values(), key=len)
    return layers[len(layers) // 2]


def _float32_layer(model: Any, s: LabSettings, rec: Any) -> dict[str, Any]:
    from transformers import DynamicCache

    odd = _layer_with_peers(model)
    for i, tokens in enumerate(s.prompt_tokens):
        cache = DynamicCache(config=model.config)
        _store_in_float32(cache.layers[odd])
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), s, past_key_values=cache)
        del out, cache
        rec.settle()
    return {"float32_layer": odd}


def _window_not_honoured(model: Any, s: LabSettings, rec: Any) -> None:
    from transformers import DynamicCache

    for i, tokens in enumerate(s.prompt_tokens):
        cache = DynamicCache()  # no config: every layer a full DynamicLayer, the window never applied
        rec.next_prompt(f"lab-{tokens}")
        out = _generate(model, _ids(model, tokens, i), s, past_key_values=cache)
        del out, cache
        rec.settle()


def _layer_types(model: Any) -> list[str]:
    """The config's declared layer types ([] for a model that declares none, e.g. GPT-NeoX)."""
    return list(getattr(model.config, "layer_types", None) or [])


def _kv_rows(model: Any, layer: int, head: int) -> list[tuple[Any, slice]] | None:
    """The output rows of the projections that make kv head `head` of `layer`: separate k/v
    projections (Llama-style, gpt-oss, Gemma), or GPT-NeoX's fused query_key_value (per head: q, k,
    v, each head_dim rows). None for attention without per-head K/V projections (MLA's latents)."""
    from kvscope.recorder.model_layout import attention_modules

    attn = next((m for i, m in attention_modules(model) if i == layer), None)
    if attn is None:
        return None
    dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    if not isinstance(dim, int):
        return None
    k_proj, v_proj = getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)
    if isinstance(k_proj, torch.nn.Linear) and isinstance(v_proj, torch.nn.Linear):
        if (head + 1) * dim > min(k_proj.out_features, v_proj.out_features):
            return None  # fewer kv heads than that (a shrunk twin may keep one)
        rows = slice(head * dim, (head + 1) * dim)
        return [(k_proj, rows), (v_proj, rows)]
    fused = getattr(attn, "query_key_value", None)
    if isinstance(fused, torch.nn.Linear) and (head + 1) * 3 * dim <= fused.out_features:
        start = head * 3 * dim
        return [(fused, slice(start + dim, start + 3 * dim))]
    return None


def zero_head(model: Any, layer: int, head: int) -> None:
    """Zero the key and value projections of one kv head: its cached K and V are then all zeros."""
    rows = _kv_rows(model, layer, head)
    if rows is None:
        raise ValueError(f"layer {layer} of {type(model).__name__} has no per-head k/v projections to zero")
    with torch.no_grad():
        for proj, part in rows:
            proj.weight[part].zero_()
            if proj.bias is not None:
                proj.bias[part].zero_()


def unfit(scenario: str, model: Any, settings: LabSettings) -> str | None:
    """Why `scenario` cannot be planted in this model (the lab skips it and says so), or None."""
    if scenario == "window_not_honoured":
        if "sliding_attention" not in _layer_types(model):
            return f"{scenario} needs declared sliding-window layers; {model.config.model_type} declares none"
        window = getattr(model.config, "sliding_window", None)
        longest = max(settings.prompt_tokens) + settings.new_tokens
        if isinstance(window, int) and longest <= window:
            return (f"{scenario} needs a context longer than the {window}-token window; the longest here is "
                    f"{longest} tokens (raise --prompt-tokens or --new-tokens)")
    if scenario in ("dead_head", "healthy_dead_head_control") and _kv_rows(model, 1, 1) is None:
        return (f"{scenario} needs a second kv head with its own k/v projections in layer 1; "
                f"{model.config.model_type}'s has none (one kv head, or MLA latents)")
    return None


def _dead_head(model: Any, s: LabSettings, rec: Any) -> dict[str, Any]:
    _plain(rec, model, s)
    return {"dead_head": {"layer": 1, "head": 1}}


def _never_settled(model: Any, s: LabSettings, rec: Any) -> None:
    _plain(rec, model, s, settle=False)


def _healthy(model: Any, s: LabSettings, rec: Any) -> None:
    _plain(rec, model, s)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("kept_caches", True, ("post_eos",), "every generation's past_key_values kept (one per request)",
             _kept_caches),
    Scenario("kept_scores", True, ("post_eos",), "output_scores and output_logits kept after each generation",
             _kept_scores),
    Scenario("kept_attentions", True, ("growth_curve",),
             "output_attentions=True with return_dict_in_generate: every step's attention weights kept",
             _kept_attentions, attn_implementation="eager"),
    Scenario("copied_keys", True, ("growth_curve",), "a logits processor keeps a copy of 4 layers' keys each step",
             _copied_keys),
    Scenario("cache_copy_callback", True, ("growth_curve",),
             "a logits processor keeps a copy of the whole cache each step", _cache_copy),
    Scenario("interleaved_growth", True, ("fragmentation",),
             "a buffer 1 MiB larger each step, allocated between the cache's own growing tensors",
             _interleaved, needs_cuda=True),
    Scenario("oom_fraction", True, ("oom_event", "oom_forecast"),
             "batch 32, up to 2048 new tokens under set_per_process_memory_fraction: a real OOM", oom_under_fraction, needs_cuda=True),
    Scenario("preallocated", True, ("preallocation_waste",), "a static cache of 8x the tokens used",
             _static(lambda s, tokens: 8 * (tokens + s.new_tokens)), cpu_detectable=True),
    Scenario("float32_layer", True, ("layer_anomaly",), "one full layer's cache stored in float32",
             _float32_layer, cpu_detectable=True),
    Scenario("window_not_honoured", True, ("layer_uniformity",),
             "DynamicCache() without the config: declared sliding layers keep every token",
             _window_not_honoured, cpu_detectable=True),
    Scenario("dead_head", True, ("dead_heads",), "kv head 1 of layer 1 has zero k/v projections", _dead_head,
             cpu_detectable=True, head_stats_every=16),
    Scenario("static_compiled", False, (), "a static cache sized to fit, generate's compile left on "
             "(compiled graphs' pools: info, not a leak)", _static(lambda s, tokens: tokens + s.new_tokens, True),
             needs_cuda=True),
    Scenario("healthy_dynamic", False, (), "dynamic cache, three prompt lengths (warm-up on new shapes)", _healthy,
             cpu_detectable=True),
    Scenario("healthy_static", False, (), "a static cache sized to prompt + new tokens",
             _static(lambda s, tokens: tokens + s.new_tokens), cpu_detectable=True),
    Scenario("healthy_never_settled", False, (), "a run that never calls settle()", _never_settled,
             cpu_detectable=True),
    Scenario("healthy_scores_dropped", False, (), "output_scores/logits requested, outputs dropped before settle()",
             _scores_dropped, cpu_detectable=True),
    Scenario("healthy_fraction", False, (), "a run under set_per_process_memory_fraction that fits",
             _fits_under_fraction, needs_cuda=True),
    Scenario("healthy_dead_head_control", False, (), "the dead-head scenario's model, no head zeroed",
             _healthy, cpu_detectable=True, head_stats_every=16),
)


def scenario_names() -> list[str]:
    return [s.name for s in SCENARIOS]
