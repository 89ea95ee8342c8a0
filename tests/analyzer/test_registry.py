"""The registry: every detector's contract, names, overrides and entry points."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
from analyzer_helpers import run_row, write_part

import kvscope.analyzer.registry as registry_module
from kvscope.analyzer import FINDING_FIELDS, Finding, analyze, load_traces
from kvscope.analyzer.registry import Detector, get_detector, parse_overrides, registry, select
from kvscope.errors import UsageError

SEED = {"growth_curve", "post_eos", "fragmentation", "layer_anomaly", "layer_uniformity", "cache_density"}


def test_registry_holds_the_seed_and_the_new_detectors() -> None:
    assert SEED | {"oom_forecast", "preallocation_waste"} <= set(registry())


@pytest.mark.parametrize("name", sorted(registry()))
def test_contract_config_is_a_frozen_dataclass_with_defaults(name: str) -> None:
    det = get_detector(name)
    assert det.name == name and det.summary
    config = det.default_config()
    assert dataclasses.is_dataclass(config)
    fields = dataclasses.fields(config)
    assert fields, f"{name} has no thresholds"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, fields[0].name, getattr(config, fields[0].name))


@pytest.mark.parametrize("name", sorted(registry()))
def test_contract_empty_trace_gives_no_findings(name: str, tmp_path: Path) -> None:
    write_part(tmp_path, "run", run_row())
    with load_traces([tmp_path]) as tables:
        assert get_detector(name).run(tables) == []


@pytest.mark.parametrize("name", sorted(registry()))
def test_contract_findings_have_the_schema(name: str, synth) -> None:  # noqa: ANN001
    trace = synth(num_layers=4, layer_types=("sliding_attention", "full_attention") * 2, sliding_window=32,
                  prompt_tokens=8, generations=2, retention=0.3, fragmentation=True, superlinear=True,
                  odd_layer=1, undeclared_sliding=True, preallocated=True)
    with load_traces([trace]) as tables:
        findings = get_detector(name).run(tables)
    for f in findings:
        assert isinstance(f, Finding) and f.detector == name
        row = f.to_dict()
        assert list(row)[: len(FINDING_FIELDS)] == list(FINDING_FIELDS)
        assert row["severity"] in ("info", "warning", "critical")
        assert isinstance(row["value"], float)
        assert row["threshold"] is None or isinstance(row["threshold"], float)
        assert row["gen_id"] is None or isinstance(row["gen_id"], int)
        assert row["layer"] is None or isinstance(row["layer"], int)
        assert row["message"].endswith(".") and "\n" not in row["message"]
        assert isinstance(row["evidence"], dict)


def test_unknown_detector_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as err:
        get_detector("kv_leak")
    assert "growth_curve" in str(err.value) and "preallocation_waste" in str(err.value)
    assert err.value.exit_code == 2


def test_overrides_convert_to_the_field_type() -> None:
    configs = parse_overrides(["growth_curve.ratio_threshold=1.5", "layer_anomaly.min_layers=4",
                               "growth_curve.check_totals=false"], select(["growth_curve", "layer_anomaly"]))
    assert configs["growth_curve"].ratio_threshold == 1.5
    assert configs["growth_curve"].check_totals is False
    assert configs["layer_anomaly"].min_layers == 4
    for bad in ("growth_curve.nope=1", "growth_curve.ratio_threshold=abc", "growth_curve=1", "nope.x=1"):
        with pytest.raises(UsageError):
            parse_overrides([bad], select(["growth_curve", "layer_anomaly"]))


def test_a_package_adds_a_detector_through_the_entry_point_group(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True)
    class Config:
        limit: int = 0  # layers rows above which the detector speaks

    def detect(tables, cfg):  # noqa: ANN001, ANN202
        (count,) = tables.rows("SELECT count(*) FROM layers")[0]
        return [Finding("row_count", "info", run, None, None, "rows", count, cfg.limit, "rows counted.")
                for (run,) in tables.rows("SELECT run_id FROM run") if count > cfg.limit]

    module = types.ModuleType("user_detectors")
    module.DETECTOR = Detector("row_count", Config, detect, "counts layers rows")  # type: ignore[attr-defined]

    class EntryPoint:
        name, value = "row_count", "user_detectors"

        def load(self) -> types.ModuleType:
            return module

    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    monkeypatch.setattr(registry_module, "entry_points",
                        lambda group: [EntryPoint()] if group == "kvscope.detectors" else [])
    assert "row_count" in registry()
    write_part(tmp_path, "run", run_row())
    with load_traces([tmp_path]) as tables:
        assert analyze(tables, ["row_count"]) == []
        assert len(analyze(tables, ["row_count"], {"row_count": Config(limit=-1)})) == 1
    monkeypatch.setattr(registry_module, "_REGISTRY", None)


def test_the_documented_example_detector_is_one_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import re
    import sys

    doc = (Path(__file__).resolve().parents[2] / "docs" / "detectors.md").read_text()
    (source,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    (tmp_path / "weak_keys_example.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__("weak_keys_example")
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [
        types.SimpleNamespace(name="weak_keys", value="weak_keys_example", load=lambda: module)])
    trace = tmp_path / "t"
    write_part(trace, "run", run_row())
    write_part(trace, "head_stats", {
        "run_id": ["r1"] * 4, "gen_id": [0] * 4, "step": [5] * 4, "layer": [2] * 4, "head": [0, 1, 2, 3],
        "stat": ["key_norm_mean"] * 4, "value": [1.5, 1e-5, 2.0, 1.1], "tokens": [64] * 4, "source": ["offline"] * 4})
    with load_traces([trace]) as tables:
        (finding,) = analyze(tables, ["weak_keys"])
    assert (finding.detector, finding.layer, finding.evidence) == ("weak_keys", 2, {"head": 1})
    sys.modules.pop("weak_keys_example", None)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)


def test_a_broken_entry_point_breaks_only_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise ImportError("no module named 'missing_dependency'")

    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [
        types.SimpleNamespace(name="broken", value="pkg.broken", load=fail)])
    assert SEED <= set(registry())
    with pytest.raises(UsageError, match="missing_dependency"):
        get_detector("broken")
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
