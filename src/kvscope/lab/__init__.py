"""The fault lab: plant each memory condition for real in a twin, record it, and label the trace.

`run_lab(out, device=...)` records one trace per scenario under `out/<scenario>/` with the
recorder (`kvscope.record`), labels each run (`run.labels`: lab scenario, planted or control, the
detectors that should flag it) and writes `out/labels.csv` for `kvscope tune` (one row per run
and detector: should that detector warn about that run?). Conditions, each planted by real code:

- kept_caches: every generation's `past_key_values` kept in a list (one per request, growing);
- kept_scores: `output_scores` / `output_logits` kept after each generation;
- kept_attentions: `output_attentions=True` kept inside generate (superlinear outside the cache);
- copied_keys: a logits processor that keeps a copy of four layers' keys each step;
- cache_copy_callback: a logits processor that keeps a copy of the whole cache each step;
- interleaved_growth: a logits processor allocating a growing buffer each step, interleaved with
  the cache's own growing allocations (fragmentation);
- oom_fraction: a real OOM under `torch.cuda.set_per_process_memory_fraction`;
- static_compiled: a static cache with generate's compile left on (pools it keeps: info);
- preallocated: a static cache preallocated far beyond the tokens used;
- float32_layer: one layer's cache stored in float32 in a bfloat16 model;
- window_not_honoured: a cache without sliding layers for a model that declares them;
- dead_head: a kv head whose k/v projections are zero;
and healthy controls: dynamic generations over new prompt lengths (first-generation warm-up), a
static cache sized to fit, a run that never calls settle(), a run under a memory fraction that
fits, and outputs with scores dropped before settling.

The analyser never imports this module (it imports torch). Conditions that only CUDA can plant
(allocator pools, fractions, compile) are skipped elsewhere with the reason in the result.
"""

from kvscope.lab.runner import LAB_DETECTORS, LabResult, run_lab, run_scenario, write_labels
from kvscope.lab.scenarios import SCENARIOS, LabSettings, Scenario, build_model, scenario_names

__all__ = ["LAB_DETECTORS", "SCENARIOS", "LabResult", "LabSettings", "Scenario", "build_model", "run_lab",
           "run_scenario", "scenario_names", "write_labels"]
