"""Online head statistics: every N forward passes, hand each layer's post-RoPE q and k to the kernels.

`HeadStatsCollector.install(model)` registers an attention implementation in transformers'
attention-function registry (``AttentionInterface``) that calls the model's own implementation
(sdpa, eager, flash, ...) with exactly the arguments it was given, and registers the wrapped
implementation's mask function under the same name (``AttentionMaskInterface``), so the model
builds the very mask it builds without the collector: the model computes what it computes
without kvscope. On sampled steps the wrapper also computes per-head statistics of the queries
and of the keys and values the attention reads (the cache after its update): key and value
norms, mean attention entropy and low-mass fraction, with the same definitions as `kvscope
kernels` (``kvscope.kernels.offline``).

The statistics follow the attention the model computes:
- the mask the model passes to its attention (padding, sliding windows, chunks) is applied as it
  is; where the model passes none (SDPA's causal shortcut, flash), causality, the layer's window
  and the padding of the `attention_mask` given to the model are applied;
- pad keys get no mass and are left out of norms; pad queries are not averaged;
- the module's `scaling` and logit `softcap` (Gemma 2) are applied as the model applies them;
- learned attention sinks (gpt-oss `s_aux`) are modelled: they join each row's softmax
  denominator, so entropy is that of the distribution over keys and the sink, and key mass is
  what the keys receive.

A statistic that cannot be computed never reaches `generate`: it is skipped, kept as an error
(`errors`, written as an `error` event with source "head_stats") and warned about once.
Caveats: a preallocated (static) cache is read up to the tokens the `attention_mask` covers;
the registration is process-wide, so install one collector at a time.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from kvscope.kernels import api, reference
from kvscope.kernels.offline import DEFAULT_LOW_MASS, STAT_COLUMNS

IMPLEMENTATION_PREFIX = "kvscope_stats_"  # + the wrapped name: "flash" checks in transformers still match
SOURCE = "online"
_MAX_ERRORS = 32  # errors kept per collector (the first ones say what went wrong)


def _registry() -> Any:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError as exc:  # transformers < 4.48 has no attention-function registry
        raise RuntimeError("online head statistics need transformers >= 4.48 (AttentionInterface)") from exc
    return ALL_ATTENTION_FUNCTIONS, AttentionInterface


def _mask_registry() -> Any:
    """transformers' mask-function registry (4.53+), or None on releases that build masks per model."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


class HeadStatsCollector:
    """Computes head statistics inside attention every `every` forward passes of one model."""

    def __init__(self, every: int, *, run_id: str = "", low_mass_threshold: float = DEFAULT_LOW_MASS,
                 keep_raw: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.run_id = run_id
        self.low_mass_threshold = low_mass_threshold
        self.gen_id = 0
        self.step = -1  # the forward pre-hook advances it to 0 at the prefill
        self.errors: list[dict[str, Any]] = []
        # keep_raw (tests): per (gen, step, layer) the per-query entropy, per-key mass and validity
        self.raw: dict[tuple[int, int, int], dict[str, torch.Tensor]] | None = {} if keep_raw else None
        self._pending: list[tuple[tuple[Any, ...], str, torch.Tensor, Any]] = []  # tokens: int or 0-dim tensor
        self._model: torch.nn.Module | None = None
        self._original: str | None = None
        self._name: str | None = None
        self._hook: Any = None
        self._padding: torch.Tensor | None = None  # the model call's 2D attention_mask [B, L] when it pads
        self._context: int | None = None  # L: tokens in context in this forward pass, when the call says
        self._bias_cache: tuple[int, torch.Tensor] | None = None
        # per forward pass: shape-only tensors shared by layers (see _geometry)
        self._geometry_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._warned = False
        self._sampling = False  # set once per forward pass by the pre-hook: the per-layer check is one read
        self._functions: dict[type, Callable[..., Any]] = {}  # wrapped function per attention class

    # -- installation -------------------------------------------------------------------------------

    def install(self, model: torch.nn.Module) -> HeadStatsCollector:
        """Route the model's attention through the wrapper; `uninstall()` restores it."""
        if self._model is not None:
            raise RuntimeError("this collector is already installed on a model")
        functions, interface = _registry()
        original = getattr(model.config, "_attn_implementation", None) or "eager"
        if original != "eager" and original not in functions:
            raise RuntimeError(f"online head statistics cannot wrap attention implementation {original!r}")
        name = IMPLEMENTATION_PREFIX + original
        masks = _mask_registry()
        if masks is not None:
            mask_functions, mask_interface = masks
            if original in mask_functions:
                # The model builds masks by implementation name: the wrapper's name gets the wrapped one's.
                mask_interface.register(name, mask_functions[original])
        elif original != "eager":
            # Before transformers 4.53 each model built its mask by comparing the name with
            # "sdpa"/"flash_attention_2": an unknown name gets an eager mask, which only eager expects.
            raise RuntimeError(f"online head statistics with {original!r} attention need transformers >= 4.53 "
                               "(use attn_implementation='eager' on older releases)")
        interface.register(name, self._attention)
        self._original, self._name = original, name
        self._model = model
        self._set_implementation(model, name)
        self._hook = model.register_forward_pre_hook(self._advance, with_kwargs=True)
        return self

    def uninstall(self) -> None:
        if self._model is None:
            return
        self._set_implementation(self._model, self._original or "eager")
        if self._hook is not None:
            self._hook.remove()
        self._model, self._hook, self._padding, self._bias_cache = None, None, None, None

    def __enter__(self) -> HeadStatsCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @staticmethod
    def _set_implementation(model: torch.nn.Module, name: str) -> None:
        setter = getattr(model, "set_attn_implementation", None)
        if setter is not None:
            try:
                setter(name)
                return
            except (ValueError, ImportError, AttributeError):
                pass
        for module in model.modules():  # older releases: set the (sub-)configs directly
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name

    # -- positions -----------------------------------------------------------------------------------

    def begin_generation(self, gen_id: int) -> None:
        """Number the following forward passes from step 0 of generation `gen_id`."""
        self.gen_id = gen_id
        self.step = -1
        self._sampling = False

    def _advance(self, _module: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.step += 1
        self._sampling = self.sampling()
        self._bias_cache = None
        if self._geometry_cache:
            self._geometry_cache = {}
        mask = kwargs.get("attention_mask")
        # The call's 2D mask gives the context length (a static cache's filled slots) and the padding;
        # whether there is any padding is asked once per sampled pass (one device sync), not per layer.
        self._padding, self._context = None, None
        if self._sampling and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._context = int(mask.shape[1])
            if not bool(mask.all()):
                self._padding = mask.bool()

    def sampling(self) -> bool:
        return self.step >= 0 and self.step % self.every == 0

    # -- the wrapped attention -----------------------------------------------------------------------

    def _wrapped_function(self, module: torch.nn.Module) -> Callable[..., Any]:
        """The implementation the model would call, resolved once per attention class."""
        fn = self._functions.get(type(module))
        if fn is not None:
            return fn
        name = self._original or "eager"
        if name != "eager":
            functions, _ = _registry()
            fn = functions[name]
        else:
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if fn is None:
                raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
        self._functions[type(module)] = fn
        return fn

    def _attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> Any:
        fn = self._functions.get(type(module)) or self._wrapped_function(module)
        result = fn(module, query, key, value, attention_mask, *args, **kwargs)
        if self._sampling:
            layer = getattr(module, "layer_idx", None)
            if isinstance(layer, int):
                try:
                    with torch.no_grad():
                        self._observe_module(module, layer, query, key, value, attention_mask, kwargs)
                except Exception as exc:  # noqa: BLE001 - a statistic must never break generate
                    self._record_error(layer, exc)
        return result

    def _observe_module(self, module: torch.nn.Module, layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]) -> None:
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", None)
        softcap = kwargs.get("softcap")
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        sinks = kwargs.get("s_aux")
        if sinks is None:
            sinks = getattr(module, "sinks", None)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 else None
        self.observe(layer, query, key, value, scale=scale, window=window, softcap=softcap, mask=mask,
                     padding=self._padding, context=self._context,
                     sinks=sinks if isinstance(sinks, torch.Tensor) else None)

    def _record_error(self, layer: int, exc: BaseException) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append({"source": "head_stats", "gen_id": self.gen_id, "step": self.step, "layer": layer,
                                "exception": type(exc).__name__, "message": str(exc)[:2000]})
        if not self._warned:
            self._warned = True
            warnings.warn(f"kvscope: head statistics skipped at layer {layer}, step {self.step} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); generation goes on unchanged", stacklevel=2)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, *,
                scale: float | None = None, window: int | None = None, softcap: float | None = None,
                mask: torch.Tensor | None = None, padding: torch.Tensor | None = None,
                context: int | None = None, sinks: torch.Tensor | None = None) -> None:
        """Statistics of one layer's q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] at the current step.

        `mask` is the 4D mask the model gave its attention (bool or additive), `padding` the 2D
        attention_mask [B, L] of the model call when it pads (queries are its last Tq), `context`
        L, the tokens in context, `sinks` [Hq] learned sink logits.
        """
        pos = (self.run_id, self.gen_id, self.step, layer)
        b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
        if not tk or key.dim() != 4:
            return
        if context is None and padding is not None:
            context = padding.shape[1]
        if context is not None and context < tk:
            # a preallocated cache: only the first L slots hold tokens, queries are the last of them
            tk = context
            key = key[:, :, :tk]
            value = value[:, :, :tk] if value is not None and value.dim() == 4 else value
            mask = mask[..., :tk] if mask is not None else None
        key_valid, query_valid = _padding_masks(padding, b, tq, tk, key.device)
        for prefix, x in (("key", key), ("value", value)):
            if x is None or x.dim() != 4 or not x.shape[2]:
                continue
            norms = api.head_norms(x)  # [B, H, T]
            if key_valid is not None and x.shape[2] == tk:
                keep = key_valid[:, None, :].expand_as(norms)
                count = keep.sum(dim=(0, 2)).clamp(min=1)
                self._pending.append((pos, f"{prefix}_norm_mean", (norms * keep).sum(dim=(0, 2)) / count,
                                      keep[:, 0].sum()))
                masked = norms.masked_fill(~keep, float("-inf")).amax(dim=(0, 2))
                self._pending.append((pos, f"{prefix}_norm_max", masked.clamp(min=0.0), keep[:, 0].sum()))
            else:
                self._pending.append((pos, f"{prefix}_norm_mean", norms.mean(dim=(0, 2)), b * x.shape[2]))
                self._pending.append((pos, f"{prefix}_norm_max", norms.amax(dim=(0, 2)), b * x.shape[2]))
        if query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
            return
        bias = self._bias(mask, query, key)
        if bias is not None:
            causal, win = False, None  # the model's own mask says what each query sees
        else:
            causal, win = True, (int(window) if window else None)
        if key_valid is not None:
            pad = torch.zeros((b, 1, tq, tk), dtype=torch.float32, device=key.device)
            pad.masked_fill_(~(query_valid[:, None, :, None] & key_valid[:, None, None, :]), float("-inf"))
            bias = pad if bias is None else bias + pad
        group = query.shape[1] // key.shape[1]
        entropy, lse = api.attention_entropy(query, key, scale=scale, causal=causal, window=win, bias=bias,
                                             softcap=softcap)
        if bias is None and sinks is None and self.raw is None and tk >= tq:
            self._observe_unmasked(pos, query, key, entropy, lse, group, scale=scale, window=win, softcap=softcap)
            return
        if sinks is not None:
            entropy, lse = _with_sinks(entropy, lse, sinks)
        rows = torch.isfinite(lse)  # [B, Hq, Tq]: queries that see a key (pad queries see none)
        if query_valid is not None:
            rows &= query_valid[:, None, :]
        n_rows = rows.sum(dim=(0, 2))
        mean_entropy = torch.where(rows, entropy, torch.zeros_like(entropy)).sum(dim=(0, 2)) / n_rows.clamp(min=1)
        self._pending.append((pos, "entropy_mean", mean_entropy, tk))
        mass = api.attention_mass(query, key, scale=scale, causal=causal, window=win, lse=lse, normalize=True,
                                  bias=bias, softcap=softcap)  # [B, Hkv, Tk]
        if bias is None:
            seen = (reference.visible_queries(tq, tk, causal=causal, window=win, device=mass.device) > 0)
            seen = seen[None, None, :].expand_as(mass)
        else:
            seen = reference.visible_pairs(query.shape[1], key.shape[1], tq, tk, causal=causal, window=win,
                                           bias=bias) > 0
        n_keys = seen.any(dim=1).sum(dim=1).clamp(min=1)  # per batch row: keys some query sees
        low = (mass < self.low_mass_threshold / n_keys[:, None, None]) & seen
        fraction = low.sum(dim=(0, 2)) / seen.sum(dim=(0, 2)).clamp(min=1)
        self._pending.append((pos, "low_mass_fraction", fraction.float(), tk))
        if self.raw is not None:
            self.raw[(self.gen_id, self.step, layer)] = {
                "entropy": entropy.detach().cpu(), "rows": rows.cpu(), "mass": mass.detach().cpu(),
                "seen": seen.cpu(), "group": torch.tensor(group)}

    def _observe_unmasked(self, pos: tuple[Any, ...], query: torch.Tensor, key: torch.Tensor, entropy: torch.Tensor,
                          lse: torch.Tensor, group: int, *, scale: float | None, window: int | None,
                          softcap: float | None) -> None:
        """Entropy mean and low-mass fraction where only causality and a window mask the keys (no 4D
        mask, no padding, no sinks: a decode step of SDPA or flash). Every query sees its own key, so
        every row counts; what depends only on the shapes is computed once per forward pass and
        shared by the layers, which keeps a sampled step to a few launches per layer."""
        b, tq, tk = query.shape[0], query.shape[2], key.shape[2]
        inverse_pairs, threshold, seen_total = self._geometry(b, tq, tk, group, window, key.device)
        self._pending.append((pos, "entropy_mean", entropy.mean(dim=(0, 2)), tk))
        mass = api.attention_mass(query, key, scale=scale, causal=True, window=window, lse=lse, softcap=softcap)
        mass = mass * inverse_pairs  # the mean probability each key receives (normalize=True)
        fraction = (mass < threshold).sum(dim=(0, 2)) / seen_total
        self._pending.append((pos, "low_mass_fraction", fraction, tk))

    def _geometry(self, b: int, tq: int, tk: int, group: int, window: int | None,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per key: 1 / (query, head) pairs that see it (0 if none), the low-mass threshold (-inf if
        unseen, so it never counts), and the number of seen (batch row, key) pairs, per forward pass."""
        key = (b, tq, tk, group, window, str(device))
        cached = self._geometry_cache.get(key)
        if cached is not None:
            return cached
        count = reference.visible_queries(tq, tk, causal=True, window=window, device=device)  # [Tk]
        seen = count > 0
        pairs = (count * group).to(torch.float32)
        inverse_pairs = torch.where(seen, 1.0 / pairs.clamp(min=1.0), torch.zeros_like(pairs))
        n_keys = seen.sum().clamp(min=1).to(torch.float32)
        threshold = torch.where(seen, self.low_mass_threshold / n_keys, torch.full_like(pairs, float("-inf")))
        seen_total = (seen.sum() * b).clamp(min=1).to(torch.float32)
        cached = self._geometry_cache[key] = (inverse_pairs, threshold, seen_total)
        return cached

    def _bias(self, mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """The model's 4D mask as an fp32 bias; layers that share one mask object share the conversion."""
        if mask is None:
            return None
        ident = (id(mask), mask.data_ptr(), tuple(mask.shape), key.shape[2])
        if self._bias_cache is not None and self._bias_cache[0] == hash(ident):
            return self._bias_cache[1]
        bias = api.as_bias(mask, query, key)
        self._bias_cache = (hash(ident), bias)
        return bias

    # -- results -------------------------------------------------------------------------------------

    def drain(self) -> dict[str, list[Any]]:
        """The statistics gathered since the last drain, as head_stats columns (one device sync)."""
        columns: dict[str, list[Any]] = {c: [] for c in STAT_COLUMNS}
        pending, self._pending = self._pending, []
        for (run_id, gen_id, step, layer), stat, values, tokens in pending:
            try:
                host = values.float().cpu().tolist()
            except Exception as exc:  # noqa: BLE001 - a failed kernel surfaces at the sync: skip its rows
                self._record_error(layer, exc)
                continue
            for head, value in enumerate(host):
                row = (run_id, gen_id, step, layer, head, stat, float(value), int(tokens), SOURCE)
                for name, item in zip(STAT_COLUMNS, row, strict=True):
                    columns[name].append(item)
        return columns

    def drain_errors(self) -> list[dict[str, Any]]:
        errors, self.errors = self.errors, []
        return errors


def _padding_masks(padding: torch.Tensor | None, b: int, tq: int, tk: int,
                   device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(key_valid [B, Tk], query_valid [B, Tq]) from the model call's 2D attention_mask, or (None, None).

    Keys are the last Tk positions of the mask (a sliding layer keeps only its window), queries its
    last Tq positions."""
    if padding is None or padding.shape[0] != b or padding.shape[1] < max(tk, tq):
        return None, None
    padding = padding.to(device)
    return padding[:, -tk:], padding[:, -tq:]


def _with_sinks(entropy: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a learned sink logit per query head into each row: the softmax over keys and the sink.

    With w = e^(lse_keys − lse_all), the share the keys get, the entropy of the joint distribution
    is w·H_keys − w·log w − (1 − w)·log(1 − w) (the grouping rule); lse_all normalises key mass."""
    sink = sinks.detach().float().to(lse.device).reshape(1, -1, 1)
    lse_all = torch.logaddexp(lse, sink.expand_as(lse))
    w = torch.exp(lse - lse_all)
    joint = w * entropy - torch.xlogy(w, w) - torch.xlogy(1 - w, 1 - w)
    finite = torch.isfinite(lse)
    return torch.where(finite, joint, entropy), torch.where(finite, lse_all, lse)

