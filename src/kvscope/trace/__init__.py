"""Trace files: the writer, the reader/validator, inspection and the synthetic builder.

Needs only pyarrow (and numpy for the synthetic builder): it runs on GPU hosts too.
"""

from kvscope.trace.invariants import InvariantReport, check_invariants
from kvscope.trace.reader import Trace, find_traces, open_trace, open_traces
from kvscope.trace.writer import TraceWriter

__all__ = ["InvariantReport", "Trace", "TraceWriter", "check_invariants", "find_traces", "open_trace", "open_traces"]
