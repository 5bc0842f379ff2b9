"""The result record (schema, environment capture, validation, atomic writes) and GPM sampling arithmetic."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mpskern import driver, results
from mpskern.driver_fakes import FakeWorkload
from mpskern.metrics import GPM_METRICS, GpmSampler


@pytest.fixture(scope="module")
def record():
    layout = driver.layout_lanes(FakeWorkload(), 2)
    options = driver.RunOptions(mode="timeslice", duration_s=0.2, warmup_s=0.0, trials=2)
    with driver.Sharing() as sharing:
        run = driver.run(layout, options, sharing, factory="mpskern.driver_fakes:build_fake_lane")
    return results.build_record(config={"clients": 2}, runs=[run], device={"name": "fake"}, argv=["test"])


def test_record_has_schema_environment_and_every_trial(record):
    results.validate_record(record)
    assert record["schema"] == "mpskern.overlap/1"
    assert record["git"]["commit"] is None or len(record["git"]["commit"]) == 40
    assert record["software"]["mpskern"] and record["software"]["python"]
    run = record["runs"][0]
    assert run["status"] == "ok" and len(run["trials"]) == 2
    window = run["trials"][0]["windows"][0]
    assert {"gpm", "clients", "finish_skew_ms"} <= set(window)
    assert run["summary"]["gain"]["n"] == 2
    json.dumps(record, allow_nan=False)  # plain, valid JSON


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r.update(schema="mpskern.overlap/0"), "this version reads"),
    (lambda r: r.pop("device"), "record lacks device"),
    (lambda r: r["runs"][0].update(status="meh"), "status must be one of"),
    (lambda r: r["runs"][0].update(status="failed", error=None), "failed without an error"),
    (lambda r: r["runs"][0]["trials"][0].pop("gain"), r"trials\[0\] lacks gain"),
    (lambda r: r["runs"][0]["trials"][0]["windows"][0]["clients"][0].pop("steps"), "lacks steps"),
])
def test_validation_names_what_is_wrong(record, breakage, message):
    broken = json.loads(json.dumps(record))
    breakage(broken)
    with pytest.raises(ValueError, match=message):
        results.validate_record(broken)


def test_atomic_write_round_trips_and_never_leaves_half_a_file(record, tmp_path):
    path = tmp_path / "sub" / "run.json"
    results.write_json_atomic(path, record)
    assert results.load_record(path) == json.loads(json.dumps(record))
    before = path.read_text()
    with pytest.raises(ValueError):
        results.write_json_atomic(path, {"bad": float("nan")})
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temp file left


def test_device_record_prefers_nvml_and_adds_what_only_cuda_knows():
    merged = results.device_record({"name": "H100 (nvml)", "driver_version": "580"},
                                   {"name": "H100 (cuda)", "sms": 132, "l2_bytes": 50 << 20})
    assert merged == {"name": "H100 (nvml)", "driver_version": "580", "sms": 132, "l2_bytes": 50 << 20}


# --- GPM ------------------------------------------------------------------------------------------------------

class _Request:
    def __init__(self):
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)]


def _fake_nvml(supported=True, values=None):
    values = values or {2: 81.5, 3: 40.25, 5: 12.0, 10: 63.0}
    freed = []

    def metrics_get(request):
        assert request.sample1 == "s1" and request.sample2 == "s2"
        for m in request.metrics[:request.numMetrics]:
            if m.metricId in values:
                m.value = values[m.metricId]
            else:
                m.nvmlReturn = 3  # NVML_ERROR_NOT_SUPPORTED
        return request

    samples = iter(["s1", "s2"])
    return SimpleNamespace(
        NVML_SUCCESS=0, NVML_GPM_METRICS_GET_VERSION=1, c_nvmlGpmMetricsGet_t=_Request,
        nvmlGpmQueryDeviceSupport=lambda handle: SimpleNamespace(isSupportedDevice=int(supported)),
        nvmlGpmSampleAlloc=lambda: next(samples), nvmlGpmSampleGet=lambda handle, sample: sample,
        nvmlGpmSampleFree=freed.append, nvmlGpmMetricsGet=metrics_get, freed=freed,
    )


def test_gpm_window_reports_the_four_metrics_and_frees_its_samples():
    nvml = _fake_nvml()
    sampler = GpmSampler(nvml=nvml, handle="gpu0")
    assert sampler.supported
    out = sampler.end(sampler.begin())
    assert out == {"supported": True, "sm_util_pct": 81.5, "sm_occupancy_pct": 40.25, "tensor_util_pct": 12.0,
                   "dram_bw_util_pct": 63.0}
    assert nvml.freed == ["s1", "s2"]
    assert list(GPM_METRICS.values()) == [2, 3, 5, 10]


def test_gpm_metric_the_device_cannot_count_is_none_not_zero():
    sampler = GpmSampler(nvml=_fake_nvml(values={2: 50.0, 3: 20.0, 10: 30.0}), handle="gpu0")
    assert sampler.end(sampler.begin())["tensor_util_pct"] is None


def test_gpm_unsupported_device_says_so():
    sampler = GpmSampler(nvml=_fake_nvml(supported=False), handle="gpu0")
    assert not sampler.supported and sampler.begin() is None
    out = sampler.end(None)
    assert out["supported"] is False and "Hopper" in out["reason"]


def test_gpm_without_nvml_says_so():
    sampler = GpmSampler()  # this CPU machine has no NVML library or GPU
    if sampler.supported:
        pytest.skip("a GPU with GPM is visible here")
    assert sampler.end(sampler.begin())["supported"] is False and sampler.reason
