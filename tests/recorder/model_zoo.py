"""Tiny random-weight models of many architectures (2 layers, hidden 64, vocabulary 256) for the
recorder's tests, and the inputs each takes. A model type this transformers lacks is skipped.

Each config starts from the family's defaults and has its sizes shrunk through whichever of the
usual attribute names it has; per-family overrides keep the code path (sliding windows, MoE, MLA,
hybrid layer patterns, state sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers

VOCAB = 256
HIDDEN = 64
LAYERS = 2
HEADS = 4
PROMPT = 5
WINDOW = 8

_SIZES: dict[tuple[str, ...], Any] = {
    ("vocab_size",): VOCAB,
    ("hidden_size", "n_embd", "d_model", "dim"): HIDDEN,
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
     "num_decoder_layers"): LAYERS,
    ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
     "decoder_attention_heads"): HEADS,
    ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
     "ffn_hidden_size"): 128,
    ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions"): 64,
    ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"): 2,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"): 32,
    ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "top_k", "moe_k"): 2,
}
_MLA = dict(head_dim=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_group=1, topk_group=1, first_k_dense_replace=1, num_key_value_heads=4)
_MAMBA = dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_heads=8, mamba_d_head=16,
              mamba_n_groups=1, mamba_chunk_size=16)

# Per-family settings on top of the shrunk defaults.
OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": dict(sliding_window=WINDOW), "qwen2": {}, "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, sliding_window_pattern=2),
    "gpt_oss": dict(head_dim=16, sliding_window=WINDOW),
    "glm4_moe": dict(head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=1),
    "deepseek_v3": _MLA, "deepseek_v2": dict(_MLA, n_group=1, topk_group=1),
    "mixtral": {}, "qwen2_moe": {}, "qwen3_moe": dict(head_dim=16), "olmoe": {}, "granitemoe": {},
    "phimoe": {}, "phi": {}, "phi3": {}, "starcoder2": {}, "olmo": {}, "olmo2": {}, "cohere": {},
    "stablelm": {}, "granite": {}, "helium": dict(head_dim=16), "smollm3": {}, "glm": dict(head_dim=16),
    "glm4": dict(head_dim=16), "gpt2": {}, "gpt_neo": dict(attention_types=[[["global", "local"], 1]],
                                                             window_size=WINDOW),
    "gpt_neox": dict(rotary_pct=0.25), "gptj": dict(rotary_dim=8), "codegen": dict(rotary_dim=8),
    "gpt_bigcode": {}, "bloom": {}, "falcon": {}, "opt": dict(word_embed_proj_dim=HIDDEN), "biogpt": {},
    "xglm": {}, "persimmon": {}, "mpt": {}, "cohere2": dict(sliding_window=WINDOW),
    "exaone4": dict(sliding_window=WINDOW, head_dim=16), "ernie4_5": dict(head_dim=16),
    "hunyuan_v1_dense": dict(head_dim=16), "arcee": {}, "seed_oss": dict(head_dim=16),
    "jetmoe": dict(kv_channels=16),
"dbrx": dict(ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4,
                                                              "moe_top_k": 2},
                                                 attn_config={"kv_n_heads": 2}),
    "apertus": {},
    # encoder-decoders
    "t5": dict(d_kv=16, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0),
    "bart": dict(forced_eos_token_id=None), "mbart": dict(forced_eos_token_id=None),
    "pegasus": dict(decoder_start_token_id=0), "marian": dict(decoder_start_token_id=0, pad_token_id=0),
    "whisper": dict(max_source_positions=16, num_mel_bins=8, decoder_start_token_id=1, eos_token_id=2,
                    pad_token_id=0, bos_token_id=1, begin_suppress_tokens=None, suppress_tokens=None),
    # state-space, recurrent and hybrid models
    "mamba": dict(state_size=8, conv_kernel=4, expand=2, time_step_rank=8),
    "falcon_mamba": dict(state_size=8, conv_kernel=4, expand=2, time_step_rank=8),
    "mamba2": dict(state_size=8, conv_kernel=4, expand=2, num_heads=8, head_dim=16, n_groups=1, chunk_size=16,
                   time_step_rank=8),
    "rwkv": dict(attention_hidden_size=HIDDEN, context_length=64),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, use_mamba_kernels=False),
    "bamba": dict(_MAMBA, attn_layer_indices=[1]),
    "granitemoehybrid": dict(_MAMBA, layer_types=["mamba", "attention"]),
    "falcon_h1": dict(_MAMBA, head_dim=16, mamba_d_ssm=128, projectors_bias=False),
    "zamba2": dict(_MAMBA, mamba_ngroups=1, layers_block_type=["mamba", "hybrid"], num_mem_blocks=1, attention_head_dim=16,
                   adapter_rank=8, use_mem_rope=False),
    "lfm2": dict(layer_types=["conv", "full_attention"], conv_L_cache=3, block_ff_dim=128,
                 block_auto_adjust_ff_dim=False),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], head_dim=16, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_conv_kernel_dim=4, decoder_sparse_step=1, shared_expert_intermediate_size=32),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=HIDDEN, attention_window_size=WINDOW,
                            head_dim=16, num_key_value_heads=1, conv1d_width=4),
    "xlstm": dict(embedding_dim=HIDDEN, num_blocks=LAYERS, num_heads=4, qk_dim_factor=1.0, v_dim_factor=1.0,
                  mode="inference", chunk_size=8),
}

ENCODER_DECODERS = ("t5", "bart", "mbart", "pegasus", "marian", "whisper")


@dataclass
class Case:
    model_type: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]

    @property
    def encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))


def tiny_config(model_type: str) -> Any:
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
    except (KeyError, ValueError) as exc:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} model ({type(exc).__name__})")
    kwargs: dict[str, Any] = {}
    for names, value in _SIZES.items():
        for name in names:
            if hasattr(default, name) and not isinstance(getattr(default, name), (dict, list)):
                kwargs[name] = value
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        token = getattr(default, name, None)
        if isinstance(token, int) and token >= VOCAB:
            kwargs[name] = {"pad_token_id": 0, "bos_token_id": 1}.get(name, 2)
    if isinstance(getattr(default, "head_dim", None), int):
        kwargs["head_dim"] = HIDDEN // HEADS
    if hasattr(default, "use_cache"):
        kwargs["use_cache"] = True
    kwargs.update(OVERRIDES.get(model_type, {}))
    # derived read-only properties (mamba's layer_types on 5.x, falcon's head_dim on 4.x) are not settable
    kwargs = {k: v for k, v in kwargs.items() if not _read_only(type(default), k)}
    return AutoConfig.for_model(model_type, **kwargs)


def _read_only(cls: type, name: str) -> bool:
    attr = getattr(cls, name, None)
    return isinstance(attr, property) and attr.fset is None


def tiny_case(model_type: str, batch: int = 1) -> Case:
    """The model in eval mode (seed 0) with its generate inputs."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

    config = tiny_config(model_type)
    torch.manual_seed(0)
    if model_type == "whisper":
        model = AutoModelForSpeechSeq2Seq.from_config(config)
        inputs = {"input_features": torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions,
                                                generator=torch.Generator().manual_seed(1))}
    else:
        auto = AutoModelForSeq2SeqLM if model_type in ENCODER_DECODERS else AutoModelForCausalLM
        model = auto.from_config(config)
        ids = (torch.arange(3, 3 + batch * PROMPT).reshape(batch, PROMPT) % 200) + 3
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return Case(model_type, model, inputs)
