"""The memory limit the recorder writes into the run row (run.memory_limit_bytes, options.memory_limit)."""

from __future__ import annotations

import pytest
import torch

from kvscope.recorder.allocator import _mps_limit_bytes, memory_limit

GIB = 1 << 30


def test_no_cuda_means_no_limit() -> None:
    assert memory_limit((), None) == (None, None)


@pytest.mark.parametrize(("value", "devices", "expected"), [
    ("2G", (0,), 2 * GIB), ("2G", (0, 1), 4 * GIB), ("0=2G,1=4096M", (0, 1), 6 * GIB),
    ("0=512M", (1,), None), ("1.5G", (0,), int(1.5 * GIB)), ("lots", (0,), None),
])
def test_mps_limit_is_parsed_per_device(value: str, devices: tuple[int, ...], expected: int | None) -> None:
    assert _mps_limit_bytes(value, devices) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_per_process_memory_fraction")
def test_a_memory_fraction_is_recorded_as_the_limit() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(0.25, 0)
    try:
        limit, info = memory_limit((0,), None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert limit == int(0.25 * total)
    assert info is not None and info["sources"][0]["kind"] == "per_process_memory_fraction"


def test_a_cap_given_by_the_caller_lands_in_the_run_row(tmp_path) -> None:  # noqa: ANN001
    # a torch that cannot report its fraction: the lab passes the cap it set in options
    from kvscope.lab import LabSettings, build_model
    from kvscope.recorder.session import Recording
    from kvscope.trace.reader import open_trace

    # pythia (gpt_neox) builds on every supported transformers release; gpt-oss needs 4.55+
    model = build_model(LabSettings(device="cpu", twin="pythia-1.4b", dtype="float32", layers=2))
    with Recording(model, tmp_path / "t", writer="thread", options={"memory_limit_bytes": 3 * GIB}) as rec:
        assert rec.metadata.memory_limit_bytes == 3 * GIB
    (row,) = open_trace(tmp_path / "t").read("run").to_pylist()
    assert row["memory_limit_bytes"] == 3 * GIB
