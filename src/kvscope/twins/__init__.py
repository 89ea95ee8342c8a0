"""Random-weight structural twins: a model built from a real model's config, without its weights.

A twin runs the same attention, cache-update and cache code as the pretrained model, so its KV
cache has the same geometry. Configs of several public models ship in `twins/configs/*.json`,
each naming its source repository. `shrink_config` keeps the KV geometry exactly and shrinks the
MLP, experts and vocabulary (and the hidden size where head_dim is explicit).
"""

from kvscope.twins.spec import TwinSpec, kv_geometry, list_twins, load_twin, shrink_config

__all__ = ["TwinSpec", "kv_geometry", "list_twins", "load_twin", "shrink_config"]
