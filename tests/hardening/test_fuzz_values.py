"""Value mutations of shipped traces (scripts/fuzz_values.py) at fixed seeds: every reading command
answers or refuses in one line. Seeds 1, 48, 57, 63, 66, 102, 106, 116 and 188 each failed before the
fixes they led to (exit 3 from a null stored_tokens, head, layer or ended_ns, a null reading in the
report's retention figure, an OOM event's detail of the wrong JSON types, NaN in a heat map); the
others are a spread of the mutations."""

from __future__ import annotations

from pathlib import Path

import pytest
from hardening_helpers import load_script

fuzz = load_script("fuzz_values")

SEEDS = [1, 48, 57, 63, 66, 102, 106, 116, 188, *range(2, 18)]


@pytest.mark.skipif(not fuzz._sources(), reason="no shipped traces")
@pytest.mark.parametrize("seed", SEEDS)
def test_a_mutated_trace_is_answered_or_refused_in_one_line(seed: int, tmp_path: Path) -> None:
    case, source, what = fuzz.build_case(seed, tmp_path)
    assert what and case.is_dir()
    assert fuzz.check_case(case, source, tmp_path) == [], what


def test_the_mutations_change_the_trace(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    changed = 0
    for seed in range(10):
        case, source, _ = fuzz.build_case(seed, tmp_path)
        for part in sorted(case.rglob("*.parquet")):
            original = source / part.relative_to(case)
            if not original.is_file() or not pq.read_table(part).equals(pq.read_table(original)):
                changed += 1
                break
    assert changed >= 8  # a mutation may leave a part as it was (a cast that fails), rarely
