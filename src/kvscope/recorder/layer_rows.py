"""Expand a batch of recorded steps into `layers` rows and step totals, vectorised, off the hook.

The per-step hook keeps raw facts per layer (`measure.FastStep`); here, in the writer (process or thread) and
once per flush, numpy turns a whole batch (up to 64 steps x all layers) into Arrow columns: unique
bytes per layer, aliasing, stored tokens and capacity, latent layers, and each step's unique bytes
over all layers (the union of its address ranges). Steps measured by the general walk arrive as
finished rows and are passed through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kvscope.recorder.facts import (
    CONTIGUOUS,
    LATENT,
    LAYER_FIELDS,
    SHAPE_END,
    FastStep,
    LayerPlan,
    StepMeasure,
    decode_facts,
    fact_list,
)
from kvscope.recorder.spans import covered_bytes

# (run_id, gen_id, step, seq_len, measured) per recorded step.
StepBatch = Sequence[tuple[str, int, int, int, "StepMeasure | FastStep"]]
Totals = dict[tuple[int, int], tuple[int, int]]  # (gen_id, step) -> (unique kv bytes, logical bytes)

_POS_SHIFT = 50  # address spaces are < 2**48: a step's position above bit 50 keeps steps apart when sorting


@dataclass
class _Facts:
    """A batch's fact records as columns: one row per layer per step."""

    counts: np.ndarray  # layers per step
    layer: np.ndarray
    k_start: np.ndarray
    k_end: np.ndarray
    k_bytes: np.ndarray
    v_start: np.ndarray
    v_end: np.ndarray
    v_bytes: np.ndarray
    k_dims: np.ndarray | list[tuple[int, ...]]  # [rows, rank] when every K has one rank
    v_dims: np.ndarray | list[tuple[int, ...]]


def _uniform_facts(flats: list[list[int]], plan: LayerPlan) -> _Facts | None:
    """Decode a batch in numpy when every record has the same K and V ranks (the usual case)."""
    joined: list[int] = []
    for flat in flats:
        joined += flat
    if not joined:
        return None
    data = np.array(joined, dtype=np.int64)
    ends = np.flatnonzero(data[:64] == SHAPE_END)  # the first record's two end markers
    if len(ends) < 2:
        return None
    k_rank, v_rank = int(ends[0]) - 5, int(ends[1] - ends[0]) - 1
    width = 7 + k_rank + v_rank
    if any(len(flat) % width for flat in flats):
        return None
    records = data.reshape(-1, width)
    # Layer indices, addresses and codes are never negative and neither are dims: records parse
    # as fixed-width rows exactly when the end markers sit in these two columns and nowhere else.
    if not ((records[:, 5 + k_rank] == SHAPE_END).all() and (records[:, -1] == SHAPE_END).all()
            and int((records[:, 5:] == SHAPE_END).sum()) == 2 * len(records)):
        return None
    layer = records[:, 0]
    k_dims, v_dims = records[:, 5:5 + k_rank], records[:, 6 + k_rank:-1]
    k_start, v_start = records[:, 1], records[:, 3]
    k_bytes = k_dims.prod(axis=1) * np.asarray(plan.k_itemsizes, dtype=np.int64)[layer]
    k_end = np.where(records[:, 2] == CONTIGUOUS, k_start + k_bytes, records[:, 2])
    if v_rank:
        v_bytes = v_dims.prod(axis=1) * np.asarray(plan.v_itemsizes, dtype=np.int64)[layer]
        v_end = np.where(records[:, 4] == CONTIGUOUS, v_start + v_bytes, records[:, 4])
    else:  # no values
        v_bytes, v_end = np.zeros(len(records), dtype=np.int64), records[:, 4]
    counts = np.array([len(flat) // width for flat in flats], dtype=np.int64)
    return _Facts(counts, layer, k_start, k_end, k_bytes, v_start, v_end, v_bytes, k_dims, v_dims)


def _decoded_facts(flats: list[list[int]], plan: LayerPlan) -> _Facts:
    """Decode a batch record by record (ranks differ between layers, or some layer has no values)."""
    per_step = [decode_facts(flat, plan) for flat in flats]
    facts = [fact for step in per_step for fact in step]
    numbers = np.array([(f.layer, f.k_start, f.k_end, f.k_bytes, f.v_start, f.v_end, f.v_bytes) for f in facts],
                       dtype=np.int64).reshape(len(facts), 7)
    counts = np.array([len(step) for step in per_step], dtype=np.int64)
    return _Facts(counts, *numbers.T, [f.k_shape for f in facts], [f.v_shape for f in facts])


def _tokens_of(dims: np.ndarray) -> np.ndarray:
    """Sequence length of each shape: dim -2, dim 0 of a 1-D tensor, 0 of a scalar."""
    if dims.shape[1] >= 2:
        return dims[:, -2].copy()
    if dims.shape[1] == 1:
        return dims[:, 0].copy()
    return np.zeros(len(dims), dtype=np.int64)


def _shape_column(shapes: np.ndarray | list[tuple[int, ...]]) -> tuple[pa.Array, np.ndarray]:
    """A list<int64> column of shapes, and the sequence length of each (dim -2, or dim 0 for 1-D)."""
    if isinstance(shapes, np.ndarray):
        rank = shapes.shape[1]
        offsets = pa.array(np.arange(0, shapes.size + 1, rank, dtype=np.int32) if rank
                           else np.zeros(len(shapes) + 1, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(shapes).reshape(-1))), _tokens_of(shapes)
    tokens = np.fromiter(((s[-2] if len(s) >= 2 else (s[0] if s else 0)) for s in shapes), np.int64, len(shapes))
    return pa.array([tuple(s) for s in shapes], type=pa.list_(pa.int64())), tokens


def _latent_mask(dims: np.ndarray | list[tuple[int, ...]], rank: int) -> np.ndarray:
    """MLA latent layers: K is [batch, 1, tokens, kv_lora_rank]."""
    if isinstance(dims, np.ndarray):
        if dims.shape[1] != 4:
            return np.zeros(len(dims), dtype=bool)
        return (dims[:, 1] == 1) & (dims[:, 3] == rank)
    return np.fromiter((len(d) == 4 and d[1] == 1 and d[3] == rank for d in dims), bool, len(dims))


def _step_totals(pos: np.ndarray, starts: np.ndarray, ends: np.ndarray, steps: int) -> np.ndarray:
    """Unique bytes per step position: the union of its address ranges."""
    keep = ends > starts
    pos, starts, ends = pos[keep], starts[keep], ends[keep]
    totals = np.zeros(steps, dtype=np.int64)

    def merge_exactly(p: int) -> int:
        mask = pos == p
        return covered_bytes(zip(starts[mask].tolist(), ends[mask].tolist(), strict=True))

    if steps >= 1 << (63 - _POS_SHIFT) or (len(starts) and int(ends.max()) >= 1 << _POS_SHIFT):
        for p in range(steps):  # out of the packed-key range: merge per step in Python
            totals[p] = merge_exactly(p)
        return totals
    key_start = (pos << _POS_SHIFT) | starts
    order = np.argsort(key_start, kind="stable")
    s_sorted = key_start[order]
    e_sorted = ((pos << _POS_SHIFT) | ends)[order]
    if len(s_sorted) > 1:
        reach = np.maximum.accumulate(e_sorted)[:-1]
        overlapping = np.unique(pos[order][1:][s_sorted[1:] < reach])
    else:
        overlapping = np.empty(0, dtype=np.int64)
    np.add.at(totals, pos, ends - starts)
    for p in overlapping.tolist():  # shared layers or fused views: merge those steps exactly
        totals[p] = merge_exactly(p)
    return totals


def _expand_fast(items: list[tuple[str, int, int, int, FastStep]], plan: LayerPlan,
                 totals: Totals) -> pa.Table:
    flats = [fact_list(item[4].facts) for item in items]
    facts = _uniform_facts(flats, plan) or _decoded_facts(flats, plan)
    counts, layer = facts.counts, facts.layer
    k_start, k_end, k_bytes = facts.k_start, facts.k_end, facts.k_bytes
    v_start, v_end, v_bytes = facts.v_start, facts.v_end, facts.v_bytes
    k_shape, stored = _shape_column(facts.k_dims)
    v_shape, _ = _shape_column(facts.v_dims)
    aliased = (v_end > v_start) & (k_start < v_end) & (v_start < k_end)
    kv_bytes = np.where(aliased, np.maximum(k_end, v_end) - np.minimum(k_start, v_start),
                        (k_end - k_start) + (v_end - v_start))
    seq_len = np.repeat(np.array([item[3] for item in items], dtype=np.int64), counts)
    static = np.array(plan.static, dtype=bool)[layer]
    capacity = pa.array(stored, mask=~static)
    stored = np.where(static, np.minimum(seq_len, stored), stored)
    # Per-layer strings as dictionary arrays (indices = layer): no Python string per row.
    indices = pa.array(layer.astype(np.int32))
    layer_type: pa.Array = pa.DictionaryArray.from_arrays(indices, pa.array(plan.layer_types, pa.string()))
    if plan.kv_lora_rank is not None:
        latent = _latent_mask(facts.k_dims, plan.kv_lora_rank)
        if latent.any():
            layer_type = pa.array(np.where(latent, LATENT, np.array(plan.layer_types, dtype=object)[layer]), pa.string())
    pos = np.repeat(np.arange(len(items), dtype=np.int64), counts)
    step_bytes = _step_totals(np.concatenate([pos, pos]), np.concatenate([k_start, v_start]),
                              np.concatenate([k_end, v_end]), len(items))
    logical = np.bincount(pos, weights=(k_bytes + v_bytes).astype(np.float64), minlength=len(items))
    for i, item in enumerate(items):
        totals[(item[1], item[2])] = (int(step_bytes[i]), int(logical[i]))
    return pa.table({
        "run_id": pa.array(np.repeat(np.array([item[0] for item in items], dtype=object), counts), pa.string())
        if len({item[0] for item in items}) > 1 else pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(len(layer), dtype=np.int32)), pa.array([items[0][0]], pa.string())),
        "gen_id": pa.array(np.repeat(np.array([item[1] for item in items], dtype=np.int32), counts)),
        "step": pa.array(np.repeat(np.array([item[2] for item in items], dtype=np.int32), counts)),
        "layer": pa.array(layer.astype(np.int32)),
        "layer_type": pa.array(layer_type, pa.string()),
        "cache_layer_class": pa.DictionaryArray.from_arrays(indices, pa.array(plan.holders, pa.string())),
        "k_shape": k_shape,
        "v_shape": v_shape,
        "k_dtype": pa.DictionaryArray.from_arrays(indices, pa.array(plan.k_dtypes, pa.string())),
        "v_dtype": pa.DictionaryArray.from_arrays(indices, pa.array(plan.v_dtypes, pa.string())),
        "k_bytes": pa.array(k_bytes),
        "v_bytes": pa.array(v_bytes),
        "kv_bytes": pa.array(kv_bytes),
        "aliased": pa.array(aliased),
        "stored_tokens": pa.array(stored),
        "capacity_tokens": capacity,
    })


def expand_steps(batch: StepBatch) -> tuple[list[pa.Table], Totals]:
    """`layers` tables for a batch of steps, and each step's (unique kv bytes, logical bytes)."""
    tables: list[pa.Table] = []
    totals: Totals = {}
    fast_groups: dict[int, tuple[LayerPlan, list]] = {}
    slow_rows: list[tuple] = []
    for run_id, gen_id, step, seq_len, measured in batch:
        if isinstance(measured, FastStep):
            if measured.facts:
                fast_groups.setdefault(id(measured.plan), (measured.plan, []))[1].append(
                    (run_id, gen_id, step, seq_len, measured))
            else:
                totals[(gen_id, step)] = (0, 0)
        else:
            slow_rows.extend((run_id, gen_id, step, *row) for row in measured.rows)
            totals[(gen_id, step)] = (measured.kv_bytes, measured.logical_bytes)
    for plan, items in fast_groups.values():
        tables.append(_expand_fast(items, plan, totals))
    if slow_rows:
        names = ("run_id", "gen_id", "step", *LAYER_FIELDS)
        columns = [list(c) for c in zip(*slow_rows, strict=True)]
        tables.append(pa.table(dict(zip(names, columns, strict=True))))
    return tables, totals
