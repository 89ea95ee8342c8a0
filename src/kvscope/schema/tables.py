"""The trace format, version 1: every table and column, with its type, unit and meaning.

This module is the single source of truth: the writer builds its Parquet schemas from it, the
reader validates against it, and ``docs/trace-format.md`` is generated from it
(``python -m kvscope.schema.docs``). Columns marked ``required`` are the contract of
``shared/design/trace-format.md``: a reader accepts any trace that has them, whoever wrote it.
Names are never reused for something else once retired; adding a column bumps the minor version.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

FORMAT_MAJOR = 1
FORMAT_MINOR = 1  # 1.1: device_steps, layer_devices; run.job_id, rank, world_size
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# Parquet key-value metadata keys written into every part file.
META_FORMAT = b"kvscope.format"
META_TABLE = b"kvscope.table"
# A compacted part lists the parts it replaces, so a crash between writing it and deleting them
# never double-counts rows: the reader ignores a listed part that still exists.
META_REPLACES = b"kvscope.replaces"

INT = pa.int64()
I32 = pa.int32()
STR = pa.string()
BOOL = pa.bool_()
F64 = pa.float64()
TS = pa.timestamp("us", tz="UTC")
SHAPE = pa.list_(pa.int64())


@dataclass(frozen=True)
class Column:
    """One column: its Arrow type, whether the contract requires it, its unit and meaning."""

    name: str
    type: pa.DataType
    doc: str
    unit: str = ""
    nullable: bool = False
    required: bool = True
    # "delta" stores monotonic integers (steps, token counts, bytes) as DELTA_BINARY_PACKED,
    # which is what makes a 4096-step trace cost under 2 bytes per layers row.
    encoding: str = "dict"


@dataclass(frozen=True)
class Table:
    """One table of a trace: a folder of Parquet parts with these columns."""

    name: str
    doc: str
    columns: tuple[Column, ...]
    # Sort order used when parts are compacted: puts repeating values next to each other.
    sort_keys: tuple[str, ...] = ()

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"table {self.name!r} has no column {name!r}")

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required_columns(self) -> list[Column]:
        return [c for c in self.columns if c.required]

    def arrow_schema(self) -> pa.Schema:
        # Optional (non-contract) columns are always nullable: other writers may leave them out.
        fields = [pa.field(c.name, c.type, nullable=c.nullable or not c.required) for c in self.columns]
        return pa.schema(
            fields,
            metadata={META_FORMAT: FORMAT_VERSION.encode(), META_TABLE: self.name.encode()},
        )


def _bytes(name: str, doc: str, *, nullable: bool = False, required: bool = True) -> Column:
    return Column(name, INT, doc, "bytes", nullable, required, "delta")


RUN_ID = Column("run_id", STR, "Identifier of the recording; every row of every table has it.")
GEN_ID = Column("gen_id", I32, "Index of the generate() call within the run, from 0.", encoding="delta")
STEP = Column("step", I32, "Forward pass within the generation; 0 is the prefill.", encoding="delta")

_MEMORY_POINTS = (
    ("baseline", "just before generate() starts"),
    ("peak", "the maximum during generate() (allocator peak counters; NVML: max of per-step reads)"),
    ("post_return", "as generate() returns, the returned object still alive"),
    ("post_release", "after the outputs are dropped and gc.collect() ran"),
    ("post_empty_cache", "after torch.cuda.empty_cache()"),
)
_MEMORY_KINDS = (
    ("allocated", "bytes allocated to live tensors by PyTorch's caching allocator"),
    ("reserved", "bytes the caching allocator holds from the driver"),
    ("nvml_used", "device memory in use as NVML reports it (all processes, driver context)"),
)


def _memory_point_columns() -> tuple[Column, ...]:
    cols = []
    for point, when in _MEMORY_POINTS:
        for kind, what in _MEMORY_KINDS:
            cols.append(
                _bytes(
                    f"{point}_{kind}_bytes",
                    f"{what.capitalize()}, {when}; null without a GPU (or without NVML).",
                    nullable=True,
                )
            )
    return tuple(cols)


RUN = Table(
    "run",
    "One row per recording: a `kvscope.record` block or one `kvscope record` CLI run.",
    (
        RUN_ID,
        Column("format_version", STR, "Trace format version `major.minor` the run was written with."),
        Column("kvscope_version", STR, "Version of kvscope that wrote the trace."),
        Column("started_at", TS, "Wall-clock instant the recording started.", "UTC timestamp"),
        Column("host", STR, "Host name of the machine that recorded."),
        Column("torch_version", STR, "torch.__version__; null for traces not made by the recorder.", nullable=True),
        Column("transformers_version", STR, "transformers.__version__; null when not recorded from a HF model.", nullable=True),
        Column("device", STR, 'Device of the model\'s first parameter, e.g. "cuda:0" or "cpu".'),
        Column("gpu_name", STR, "CUDA device name; null on CPU.", nullable=True),
        Column("driver_version", STR, "NVIDIA driver version from NVML; null without NVML.", nullable=True),
        Column("model_name", STR, "Model directory, hub name or twin name."),
        Column("model_type", STR, "config.model_type, e.g. gpt_neox, gemma3_text, gpt_oss."),
        Column("model_config", STR, "The model's config as a JSON object (config.to_dict()).", "JSON"),
        Column("dtype", STR, "Dtype of the model's parameters, torch name without `torch.`."),
        Column("attn_implementation", STR, 'config._attn_implementation, e.g. "sdpa", "eager".'),
        Column("num_layers", I32, "Number of decoder attention layers."),
        Column("layer_types", pa.list_(STR), "Declared type of each layer, in order (HF `layer_types` words)."),
        Column("labels", STR, "User key/values given at record time, a JSON object.", "JSON"),
        Column("tokenizer", STR, 'How prompts became ids: the tokenizer\'s name, or "byte-level" for twins.', nullable=True, required=False),
        Column("options", STR, "Recorder options in effect (sampling, flush interval, compile off, ...), JSON.", "JSON", nullable=True, required=False),
        Column("nvml_total_bytes", INT, "Total device memory from NVML; null without NVML.", "bytes", nullable=True, required=False),
        Column("memory_limit_bytes", INT, "Device memory this process may use when it is capped below the device's "
               "total: torch.cuda.set_per_process_memory_fraction x the device's memory, a MIG slice or an MPS "
               "limit (which one: options.memory_limit); null when uncapped or without CUDA.", "bytes",
               nullable=True, required=False),
        Column("job_id", STR, "Identifier shared by the ranks of one distributed job (tensor parallel under "
               "torchrun): each rank records its own run into one parent folder; null for one process.",
               nullable=True, required=False),
        Column("rank", I32, "This process's rank in the job (torch.distributed); null for one process.",
               nullable=True, required=False),
        Column("world_size", I32, "Processes in the job; null for one process.", nullable=True, required=False),
    ),
)

GENERATIONS = Table(
    "generations",
    "One row per generate() call, written when it ends (a crash mid-generation leaves its steps "
    "without this row).",
    (
        RUN_ID,
        GEN_ID,
        Column("prompt_id", STR, "Identifier of the prompt (from the prompts file, or `gen-N`)."),
        Column("prompt_tokens", INT, "Tokens in the prompt (per sequence).", "tokens"),
        Column("new_tokens", INT, "Tokens generated (per sequence, longest).", "tokens"),
        Column("eos_reached", BOOL, "Whether every sequence ended with an EOS token."),
        Column("cache_class", STR, "Class name of the cache object, e.g. DynamicCache, StaticCache, tuple."),
        Column("started_ns", INT, "Start of generate(), nanoseconds since the run started.", "ns", encoding="delta"),
        Column("ended_ns", INT, "Return of generate(), nanoseconds since the run started.", "ns", encoding="delta"),
        *_memory_point_columns(),
        Column("batch_size", I32, "Sequences in the batch.", required=False, nullable=True),
        Column("prompt_text", STR, "The prompt, only when store_prompts is on.", nullable=True, required=False),
    ),
    sort_keys=("run_id", "gen_id"),
)

STEPS = Table(
    "steps",
    "One row per model forward pass; step 0 is the prefill.",
    (
        RUN_ID,
        GEN_ID,
        STEP,
        Column("t_ns", INT, "End of the forward pass, nanoseconds since the run started.", "ns", encoding="delta"),
        Column("seq_len", INT, "Tokens in context after the step.", "tokens", encoding="delta"),
        Column("batch_size", I32, "Sequences in the batch."),
        _bytes("kv_bytes", "Unique bytes of all layers' KV tensors, each storage span counted once."),
        _bytes("allocated_bytes", "memory_stats allocated_bytes.all.current; null without CUDA.", nullable=True),
        _bytes("reserved_bytes", "memory_stats reserved_bytes.all.current; null without CUDA.", nullable=True),
        _bytes("active_bytes", "memory_stats active_bytes.all.current; null without CUDA.", nullable=True),
        _bytes("inactive_split_bytes", "memory_stats inactive_split_bytes.all.current: free bytes stranded in split blocks; null without CUDA.", nullable=True),
        Column("alloc_retries", INT, "memory_stats num_alloc_retries (cumulative); null without CUDA.", "count", True, encoding="delta"),
        Column("num_ooms", INT, "memory_stats num_ooms (cumulative); null without CUDA.", "count", True, encoding="delta"),
        _bytes("nvml_used_bytes", "NVML used memory of the model's device(s) (summed), polled off the decode loop: the first reading taken at or after the step (about 1 ms later at most); null without NVML.", nullable=True),
        _bytes("nvml_total_bytes", "NVML total memory of the model's device; null without NVML.", nullable=True),
        _bytes("kv_logical_bytes", "Sum over layers of K and V logical bytes (numel x element size), aliases counted twice.", required=False),
        Column("recorder_ns", INT, "Time the recorder itself spent on this step (hooks, telemetry, buffering).", "ns", True, False, "delta"),
    ),
    sort_keys=("run_id", "gen_id", "step"),
)

LAYERS = Table(
    "layers",
    "One row per (step, attention layer).",
    (
        RUN_ID,
        GEN_ID,
        STEP,
        Column("layer", I32, "Layer index in the decoder stack.", encoding="delta"),
        Column("layer_type", STR, 'full_attention, sliding_attention, latent (MLA), or the model\'s own word.'),
        Column("cache_layer_class", STR, "Class holding this layer's tensors, e.g. DynamicLayer, StaticSlidingWindowLayer, tuple."),
        Column("k_shape", SHAPE, "Shape of the cached keys (latent: c_kv)."),
        Column("v_shape", SHAPE, "Shape of the cached values (latent: k_pe)."),
        Column("k_dtype", STR, "Dtype of the cached keys, torch name without `torch.`."),
        Column("v_dtype", STR, "Dtype of the cached values."),
        _bytes("k_bytes", "Logical bytes of the keys: numel x element size (quantized: packed storage)."),
        _bytes("v_bytes", "Logical bytes of the values."),
        _bytes("kv_bytes", "Unique bytes of K and V: storage spans, aliased storage counted once."),
        Column("aliased", BOOL, "K and V share storage (the same or overlapping spans)."),
        Column("stored_tokens", INT, "Length of the sequence dimension held.", "tokens", encoding="delta"),
        Column("capacity_tokens", INT, "Preallocated length (static/sliding-static caches); null for growing caches.", "tokens", True, encoding="delta"),
    ),
    sort_keys=("run_id", "gen_id", "layer", "step"),
)

KV_SAMPLES = Table(
    "kv_samples",
    "Sampled cache tensors (opt-in), contiguous copies taken inside the hook.",
    (
        RUN_ID,
        GEN_ID,
        STEP,
        Column("layer", I32, "Layer index."),
        Column("tensor", STR, '"k", "v", "q" or "latent".'),
        Column("shape", SHAPE, "Shape of the sampled tensor."),
        Column("dtype", STR, "Dtype of the sampled tensor, torch name."),
        Column("data", pa.binary(), "Raw little-endian bytes of the contiguous tensor.", "bytes"),
    ),
    sort_keys=("run_id", "gen_id", "step", "layer", "tensor"),
)

EVENTS = Table(
    "events",
    "Out-of-memory errors, user markers, recorder errors and flushes.",
    (
        RUN_ID,
        Column("gen_id", I32, "Generation the event belongs to, if any.", nullable=True),
        Column("step", I32, "Step the event belongs to, if any.", nullable=True),
        Column("t_ns", INT, "Nanoseconds since the run started.", "ns"),
        Column("kind", STR, '"oom", "marker", "error", "flush", "compile", ...'),
        Column("detail", STR, "Event details, a JSON object.", "JSON"),
    ),
    sort_keys=("run_id", "t_ns"),
)

HEAD_STATS = Table(
    "head_stats",
    "Per-head statistics computed by the kernels (online every N steps or offline from kv_samples).",
    (
        RUN_ID,
        GEN_ID,
        STEP,
        Column("layer", I32, "Layer index."),
        Column("head", I32, "Head index (kv head for key/value stats, query head for entropy)."),
        Column("stat", STR, "key_norm_mean, value_norm_mean, key_norm_max, value_norm_max, entropy_mean, "
               "low_mass_fraction, latent_effective_rank, ..."),
        Column("value", F64, "The statistic's value (nats for entropy)."),
        Column("tokens", INT, "Tokens the statistic covers.", "tokens"),
        Column("source", STR, '"online" (recorder) or "offline" (kvscope kernels).'),
    ),
    sort_keys=("run_id", "gen_id", "step", "layer", "head", "stat"),
)

# One row per (step, device) rather than per-device columns in `steps`: the number of devices
# differs from run to run (1 to 8 or more) and a long table keeps one schema for every run and
# lets SQL group by device. Written only when the model's caches or parameters span more than one
# device; `steps` keeps the totals (summed), so single-device readers see what they always saw.
DEVICE_STEPS = Table(
    "device_steps",
    "Per step and device, for models split over several devices (device_map, pipeline style): the KV "
    "bytes of the layers whose cache lives there and that device's allocator and NVML readings. Step "
    "-1 holds a generation's baseline (before generate) and step -2 its reading after generate "
    "returned and the cache was released (`settle()`), so retention is judged per device.",
    (
        RUN_ID,
        GEN_ID,
        Column("step", I32, "Forward pass within the generation (as in steps); -1 the baseline before "
               "generate, -2 the reading after it returned and its cache was released.", encoding="delta"),
        Column("device", STR, 'The device, e.g. "cuda:1".'),
        _bytes("kv_bytes", "Unique bytes of the KV tensors of the layers whose cache lives on this device; "
               "null where the writer left it to the reader (the recorder: the sum of this device's layers' "
               "`layers.kv_bytes`, by `layer_devices`).", nullable=True, required=False),
        Column("layers", I32, "Layers whose cache lives on this device; null as kv_bytes.", nullable=True,
               required=False),
        _bytes("allocated_bytes", "memory_stats(device) allocated_bytes.all.current; null without CUDA.", nullable=True),
        _bytes("reserved_bytes", "memory_stats(device) reserved_bytes.all.current; null without CUDA.", nullable=True),
        _bytes("inactive_split_bytes", "memory_stats(device) inactive_split_bytes.all.current; null without CUDA.",
               nullable=True),
        _bytes("nvml_used_bytes", "NVML used memory of this device; null without NVML.", nullable=True),
        _bytes("nvml_total_bytes", "NVML total memory of this device; null without NVML.", nullable=True),
        _bytes("memory_limit_bytes", "This device's memory cap for the process (as run.memory_limit_bytes); "
               "null when uncapped.", nullable=True, required=False),
    ),
    sort_keys=("run_id", "gen_id", "device", "step"),
)

# A layer's cache stays on one device for a whole generation: one row per (generation, layer)
# instead of a column repeated on every `layers` row.
LAYER_DEVICES = Table(
    "layer_devices",
    "The device each layer's cache lives on, per generation (models split over several devices).",
    (
        RUN_ID,
        GEN_ID,
        Column("layer", I32, "Layer index in the decoder stack."),
        Column("device", STR, 'The device of the layer\'s cached keys, e.g. "cuda:1".'),
    ),
    sort_keys=("run_id", "gen_id", "layer"),
)

TABLES: dict[str, Table] = {
    t.name: t for t in (RUN, GENERATIONS, STEPS, LAYERS, KV_SAMPLES, EVENTS, HEAD_STATS, DEVICE_STEPS, LAYER_DEVICES)
}
