"""What the headline of each planted lab scenario must say (the words a user reads first)."""

HEADLINES = {
    "cache_copy_callback": "outside cache: grows", "copied_keys": "outside cache: grows",
    "kept_attentions": "outside cache: grows", "dead_head": "KV cache: dead KV heads in layer 1",
    "float32_layer": "KV cache: odd layer", "window_not_honoured": "KV cache: sliding window not honoured",
    "interleaved_growth": "fragmentation: high", "kept_caches": "retention: leak: live tensors",
    "kept_scores": "retention: leak: live tensors", "static_kept_by_kwargs": "retention: leak: live tensors",
    "preallocated": "KV cache: static", "oom_fraction": "OOM forecast: ran out",
}
