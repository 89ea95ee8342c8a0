"""Column orders of the rows the recorder makes, derived from `schema/tables.py` in one place.

The hook builds each `steps` row as a tuple in `HOOK_STEP_COLUMNS` order: the schema's columns
without those the writer fills in per batch (`WRITER_STEP_COLUMNS`). The allocator reading's first
six fields are `ALLOCATOR_COLUMNS`, in schema order (the C++ `allocator_stats` returns the same
order, tested). Layer rows of the general walk are tuples in `LAYER_COLUMNS` order after run_id,
gen_id and step. No torch: the writer process imports this module.
"""

from __future__ import annotations

from kvscope.schema.tables import TABLES

STEP_COLUMNS = tuple(TABLES["steps"].column_names)
# Filled in by the writer: unique and logical bytes from the batch's layers, NVML from its polling.
WRITER_STEP_COLUMNS = ("kv_bytes", "nvml_used_bytes", "kv_logical_bytes")
HOOK_STEP_COLUMNS = tuple(c for c in STEP_COLUMNS if c not in WRITER_STEP_COLUMNS)
ALLOCATOR_COLUMNS = ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes", "alloc_retries",
                     "num_ooms")
ALLOCATOR_AT = HOOK_STEP_COLUMNS.index(ALLOCATOR_COLUMNS[0])  # where the reading's fields go in a hook row

LAYER_COLUMNS = tuple(TABLES["layers"].column_names[3:])  # after run_id, gen_id, step
EVENT_COLUMNS = tuple(TABLES["events"].column_names)
SAMPLE_COLUMNS = tuple(TABLES["kv_samples"].column_names)
