"""What the hook hands to the writer, and how it is decoded: plain data, no torch.

The writer process (`writer_process.py`) unpickles these objects and expands them, so this
module, `spans.py` and `layer_rows.py` import neither torch nor the recorder's session.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvscope.recorder.columns import LAYER_COLUMNS
from kvscope.recorder.spans import Span, covered_bytes, union_bytes

LATENT = "latent"  # the layer type of MLA layers that cache latents

# Order of the fields in a layer row tuple (after run_id/gen_id/step, added by the step recorder).
LAYER_FIELDS = LAYER_COLUMNS


@dataclass
class StepMeasure:
    """One step's layer rows (general walk) and the storage spans of every layer."""

    rows: list[tuple] = field(default_factory=list)
    logical_bytes: int = 0
    # (layer, name, tensor) to copy, set by the hook and dropped before the step is handed over
    sample_tensors: list[tuple[int, str, Any]] | None = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    @property
    def layer_count(self) -> int:
        return len(self.rows)

    @property
    def kv_bytes(self) -> int:
        """All layers' unique bytes: spans merged per storage, so shared layers count once (read by
        the writer, off the hook)."""
        return union_bytes(self.spans)


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer constants of one `cache.layers` list, read once per generation, not per step."""

    holders: tuple[str, ...]  # cache-layer class names
    static: tuple[bool, ...]  # preallocated (StaticLayer and subclasses)
    layer_types: tuple[str, ...]  # declared types (latent is decided per step from the shape)
    k_dtypes: tuple[str, ...]
    v_dtypes: tuple[str, ...]
    kv_lora_rank: int | None
    k_itemsizes: tuple[int, ...] = ()  # bytes per element: logical bytes are numel x itemsize
    v_itemsizes: tuple[int, ...] = ()


# A fact record in `FastStep.facts` (a flat list of ints):
#   layer, k_start, k_code, v_start, v_code, *k_shape, SHAPE_END, *v_shape, SHAPE_END
# A code is CONTIGUOUS (the tensor's span is exactly its bytes, computed later from the shape) or
# the end address of its span. A layer without values has v_start = v_code = 0 and no v dims.
SHAPE_END = -1  # dims, addresses and layer indices are never negative
CONTIGUOUS = 1  # `is_contiguous()` is True == 1; no span ends at address 1


class Fact(NamedTuple):
    """One decoded fact record (for the rare per-step readers; the writer decodes whole batches)."""

    layer: int
    k_start: int
    k_end: int
    k_bytes: int
    k_shape: tuple[int, ...]
    v_start: int
    v_end: int
    v_bytes: int
    v_shape: tuple[int, ...]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def fact_list(facts: list[int] | bytes) -> list[int]:
    """The flat int list of a step's facts, whichever path captured them."""
    return array("q", facts).tolist() if isinstance(facts, bytes) else facts


def decode_facts(flat: list[int], plan: LayerPlan) -> list[Fact]:
    """The records of one step's flat fact list, with bytes and span ends resolved."""
    facts: list[Fact] = []
    i, n = 0, len(flat)
    while i < n:
        layer, k_start, k_code, v_start, v_code = flat[i:i + 5]
        j = flat.index(SHAPE_END, i + 5)
        k_shape = tuple(flat[i + 5:j])
        m = flat.index(SHAPE_END, j + 1)
        v_shape = tuple(flat[j + 1:m])
        i = m + 1
        k_bytes = _numel(k_shape) * plan.k_itemsizes[layer]
        k_end = k_start + k_bytes if k_code == CONTIGUOUS else k_code
        if v_shape:
            v_bytes = _numel(v_shape) * plan.v_itemsizes[layer]
            v_end = v_start + v_bytes if v_code == CONTIGUOUS else v_code
        else:
            v_bytes, v_end = 0, v_code
        facts.append(Fact(layer, k_start, k_end, k_bytes, k_shape, v_start, v_end, v_bytes, v_shape))
    return facts


@dataclass(slots=True)
class FastStep:
    """One step of a cache whose layers are all plain/static: raw facts per layer, expanded into
    rows later and vectorised (`layer_rows.py`), so the hook does as little Python as possible.

    `facts` is one flat list of ints (records described at `SHAPE_END`): ints are not tracked by
    the garbage collector, so a buffered step holds a few tracked objects rather than three per
    layer, and the recorder triggers (almost) no collections. Spans are absolute address ranges
    (storage base + offset). With CUDA's unified virtual addressing no two live allocations of a
    process share an address, on any device or the host, so the union of address ranges is the
    union of storage spans, without creating storage objects.
    """

    plan: LayerPlan
    facts: list[int] | bytes  # bytes: the same records as native int64 (the C++ fast path)
    sample_tensors: list[tuple[int, str, Any]] | None = None

    def __reduce__(self) -> tuple[type, tuple[LayerPlan, list[int] | bytes]]:
        # The writer process receives steps pickled, 64 per hand-over, on the decode loop's thread:
        # a plain constructor call pickles in 0.6 of the time of the slots dataclass's state protocol.
        # Sample tensors never travel (the hook drops them before the hand-over).
        return FastStep, (self.plan, self.facts)

    def decoded(self) -> list[Fact]:
        return decode_facts(fact_list(self.facts), self.plan)

    @property
    def kv_bytes(self) -> int:
        facts = self.decoded()
        return covered_bytes([(f.k_start, f.k_end) for f in facts] + [(f.v_start, f.v_end) for f in facts])

    @property
    def logical_bytes(self) -> int:
        return sum(f.k_bytes + f.v_bytes for f in self.decoded())

    @property
    def layer_count(self) -> int:
        return len(self.decoded())
