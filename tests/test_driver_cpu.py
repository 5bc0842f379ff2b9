"""Driver orchestration with real client processes running CPU stand-in lanes (mpskern.driver_fakes):
layouts, windows, trials, the gain arithmetic, and clients that die, hang, raise or fault."""
from __future__ import annotations

import dataclasses
import time

import pytest

from mpskern import driver, gain, mps
from mpskern.client import LaneSpec, run_window
from mpskern.driver_fakes import FakeLane, FakeWorkload

FACTORY = "mpskern.driver_fakes:build_fake_lane"
FAST = driver.RunOptions(mode="timeslice", duration_s=0.25, warmup_s=0.05, trials=3, startup_timeout_s=30,
                         window_timeout_s=1.0, attach_timeout_s=0.5, shutdown_grace_s=5)


def run(layout, mode="timeslice", sharing=None, **options):
    opts = dataclasses.replace(FAST, mode=mode, **options)
    if sharing is not None:
        return driver.run(layout, opts, sharing, factory=FACTORY)
    with driver.Sharing() as own:
        return driver.run(layout, opts, own, factory=FACTORY)


def with_lane(layout, index, **changes):
    """The layout with lane ``index``'s fake workload changed (to make one client misbehave)."""
    lanes = list(layout.lanes)
    lanes[index] = dataclasses.replace(lanes[index], workload=dataclasses.replace(lanes[index].workload, **changes))
    return dataclasses.replace(layout, lanes=tuple(lanes))


def assert_gone(record):
    pids = {lane["pid"] for lane in record["lanes"]} | {f["pid"] for f in record["failures"]}
    for pid in pids:
        assert not mps._alive(pid), f"client {pid} left running"



# --- layouts -------------------------------------------------------------------------------------------------

def test_replicated_layout_measures_each_client_as_its_own_reference():
    layout = driver.layout_lanes(FakeWorkload(batch=64), 3)
    assert [lane.role for lane in layout.lanes] == ["shared"] * 3
    assert layout.reference_of == {0: 0, 1: 1, 2: 2}
    assert all(lane.workload.batch == 64 for lane in layout.lanes)


def test_split_layout_divides_the_batch_and_adds_a_full_batch_reference():
    layout = driver.layout_lanes(FakeWorkload(batch=64), 3, split=True)
    assert [lane.workload.batch for lane in layout.lanes] == [22, 21, 21, 64]
    assert layout.lanes[3].role == "reference" and layout.reference_of == {0: 3, 1: 3, 2: 3}


def test_pair_layout_has_one_reference_per_stream():
    layout = driver.layout_lanes(FakeWorkload(), 4, kernels=["attn", "mlp"])
    assert [lane.workload.kernel for lane in layout.lanes] == ["attn", "mlp", "attn", "mlp"]
    assert layout.reference_of == {0: 0, 1: 1, 2: 2, 3: 3}


def test_thread_limited_clients_get_an_unrestricted_reference():
    layout = driver.layout_lanes(FakeWorkload(), 2, thread_pct=[30, 70])
    assert [lane.thread_pct for lane in layout.lanes] == [30, 70, None]
    assert layout.reference_of == {0: 2, 1: 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(clients=0), "1..8"),
    (dict(clients=9), "1..8"),
    (dict(clients=1, kernels=["attn", "mlp"]), "only 1 clients"),
    (dict(clients=3, split=True, workload=FakeWorkload(batch=2)), "cannot be divided"),
    (dict(clients=2, fault_client=2), "clients are 0..1"),
    (dict(clients=2, thread_pct=[50]), "1 percentages for 2 clients"),
    (dict(clients=2, thread_pct=0), "1..100"),
    (dict(clients=2, launch="lazy"), "unknown launch"),
])
def test_bad_layouts_are_config_errors(kwargs, message):
    kwargs.setdefault("workload", FakeWorkload())
    with pytest.raises(driver.ConfigError, match=message):
        driver.layout_lanes(**kwargs)


# --- the window loop, in process -----------------------------------------------------------------------------

class _DepthLane(FakeLane):
    """Records how many steps were ever queued at once."""

    def __init__(self, spec):
        super().__init__(spec)
        self.queued, self.max_queued = 0, 0

    def launch(self):
        super().launch()
        self.queued += 1
        self.max_queued = max(self.max_queued, self.queued)

    def fence(self):
        return object()

    def wait(self, token):
        super().wait(token)
        self.queued -= 1


def test_window_counts_steps_until_the_deadline_with_bounded_queue():
    lane = _DepthLane(LaneSpec(0, "shared", FakeWorkload(step_s=0.005)))
    start = time.monotonic()
    result = run_window([lane], start + 0.2, in_flight=3)
    steps = result["lanes"][0]["steps"]
    assert 20 <= steps <= 45  # ~40 steps of 5 ms in 0.2 s
    assert lane.max_queued <= 3
    assert result["lanes"][0]["t_finish"] >= start + 0.2


def test_window_injects_the_fault_once_and_the_lane_raises():
    lanes = [FakeLane(LaneSpec(i, "shared", FakeWorkload(step_s=0.002))) for i in range(2)]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_window(lanes, time.monotonic() + 0.2, in_flight=2, fault=(1, time.monotonic() + 0.05))


# --- gain arithmetic -----------------------------------------------------------------------------------------

def test_trial_numbers_follow_the_definitions():
    alone = {0: {"tokens_per_s": 100.0, "step_ms": 10.0}, 2: {"tokens_per_s": 50.0, "step_ms": 20.0}}
    shared = {0: {"tokens_per_s": 80.0, "step_ms": 12.5}, 1: {"tokens_per_s": 30.0, "step_ms": 40.0}}
    t = gain.trial(alone, shared, {0: 0, 1: 2})
    assert t["stp"] == pytest.approx(0.8 + 0.6)
    assert t["gain"] == pytest.approx(0.4)
    assert t["aggregate_tokens_per_s"] == pytest.approx(110.0)
    assert [c["latency_inflation"] for c in t["clients"]] == pytest.approx([1.25, 2.0])
    assert gain.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert gain.spread([None]) is None


def test_each_client_is_divided_by_its_own_alone_rate():
    # a process that runs 20% slower alone and shared (e.g. its buffers' placement) does not move the gain
    alone = {0: {"tokens_per_s": 100.0, "step_ms": 10.0}, 1: {"tokens_per_s": 80.0, "step_ms": 12.5}}
    shared = {0: {"tokens_per_s": 60.0, "step_ms": 16.7}, 1: {"tokens_per_s": 48.0, "step_ms": 20.8}}
    assert gain.trial(alone, shared, {0: 0, 1: 1})["gain"] == pytest.approx(0.2)
    assert gain.trial(alone, shared, {0: 0, 1: 0})["gain"] == pytest.approx(0.08)  # client 0 as both references


# --- whole configurations ------------------------------------------------------------------------------------

def test_replicated_run_measures_each_trial_in_alternating_order():
    record = run(driver.layout_lanes(FakeWorkload(step_s=0.003), 2))
    assert record["status"] == "ok", record["error"]
    assert len(record["trials"]) == 3
    orders = [[w["kind"] for w in t["windows"]] for t in record["trials"]]
    # each client alone (its own reference), then both; the next trial in reverse
    assert orders == [["alone", "alone", "shared"], ["shared", "alone", "alone"], ["alone", "alone", "shared"]]
    assert [w["lanes"] for w in record["trials"][0]["windows"]] == [[0], [1], [0, 1]]
    # sleeping lanes overlap perfectly: two clients do twice the work
    assert record["summary"]["gain"]["median"] == pytest.approx(1.0, abs=0.2)
    assert record["summary"]["latency_inflation_mean"]["median"] == pytest.approx(1.0, abs=0.2)
    shared = record["trials"][0]["windows"][2]
    assert sorted(c["lane"] for c in shared["clients"]) == [0, 1]
    assert all(c["steps"] > 0 and c["tokens_per_s"] > 0 for c in shared["clients"])
    assert shared["gpm"]["supported"] is False and shared["gpm"]["reason"]
    assert len({lane["pid"] for lane in record["lanes"]}) == 2
    assert_gone(record)


def test_clients_build_their_streams_one_after_another():
    record = run(driver.layout_lanes(FakeWorkload(build_s=0.3), 3), trials=1)
    assert record["status"] == "ok", record["error"]
    built = sorted(lane["built"] for lane in record["lanes"])
    assert all(end - start >= 0.3 for start, end in built)
    assert all(earlier[1] <= later[0] for earlier, later in zip(built, built[1:])), built


def test_split_run_compares_with_the_full_batch_reference():
    # step = 2 ms + 50 us per sequence: full batch 64 -> 5.2 ms; 32 -> 3.6 ms. Expected gain 2*(32/3.6)/(64/5.2)-1
    layout = driver.layout_lanes(FakeWorkload(batch=64, step_s=0.002, per_token_s=5e-5), 2, split=True)
    record = run(layout)
    assert record["status"] == "ok", record["error"]
    expected = 2 * (32 / 3.6) / (64 / 5.2) - 1
    assert record["summary"]["gain"]["median"] == pytest.approx(expected, abs=0.12)
    assert record["lanes"][2]["role"] == "reference" and record["lanes"][2]["workload"]["batch"] == 64


def test_pair_run_measures_each_stream_alone():
    record = run(driver.layout_lanes(FakeWorkload(), 2, kernels=["attn", "mlp"]), trials=1)
    assert record["status"] == "ok", record["error"]
    assert set(record["summary"]["alone_tokens_per_s"]) == {"0", "1"}
    assert record["summary"]["stp"]["median"] == pytest.approx(2.0, abs=0.3)


def test_streams_mode_hosts_every_lane_in_one_process():
    record = run(driver.layout_lanes(FakeWorkload(), 3), mode="streams", trials=1)
    assert record["status"] == "ok", record["error"]
    assert len({lane["pid"] for lane in record["lanes"]}) == 1


def test_timeslice_clients_cannot_reach_any_mps_daemon():
    record = run(driver.layout_lanes(FakeWorkload(), 2), trials=1)
    pipes = {lane["info"]["mps_env"]["CUDA_MPS_PIPE_DIRECTORY"] for lane in record["lanes"]}
    assert len(pipes) == 1 and "mpskern-nomps-" in pipes.pop()
    assert record["attach"]["verified"] is None


def test_mps_run_verifies_attachment_and_passes_thread_percentages(fake_mps):
    layout = driver.layout_lanes(FakeWorkload(), 2, thread_pct=[40, 60])
    with driver.Sharing() as sharing:
        record = run(layout, mode="mps", sharing=sharing, trials=1)
        pipe = sharing.daemon.pipe_dir
    assert record["status"] == "ok", record["error"]
    assert record["attach"]["verified"] and record["attach"]["sources"] == ["control"]
    envs = [lane["info"]["mps_env"] for lane in record["lanes"]]
    assert [e["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] for e in envs] == ["40", "60", None]
    assert {e["CUDA_MPS_PIPE_DIRECTORY"] for e in envs} == {pipe}


def test_unattached_client_fails_the_run_and_restarts_the_daemon(fake_mps):
    layout = with_lane(driver.layout_lanes(FakeWorkload(), 2), 1, attach=False)
    with driver.Sharing() as sharing:
        sharing.prepare(["mps"])
        first = sharing.daemon.pid
        record = run(layout, mode="mps", sharing=sharing)
        assert sharing.daemon.pid != first and not mps._alive(first)
    assert record["status"] == "failed"
    assert "not attached" in record["error"] and str(record["lanes"][1]["pid"]) in record["error"]
    assert record["recovery"] == {"daemon_restarted": True}
    assert_gone(record)


def test_client_that_dies_mid_window_is_reported_with_the_others_fate():
    layout = with_lane(driver.layout_lanes(FakeWorkload(), 2), 1, die_at="window")
    layout = dataclasses.replace(layout, reference_of={0: 0, 1: 0})  # lane 1's first window is a shared one
    record = run(layout)
    assert record["status"] == "failed"
    by_lane = {f["lanes"][0]: f for f in record["failures"]}
    assert by_lane[1]["status"] == "killed" and "code 3" in by_lane[1]["detail"]
    assert by_lane[0]["status"] == "ok"
    assert_gone(record)


def test_client_that_hangs_hits_the_window_timeout():
    layout = with_lane(driver.layout_lanes(FakeWorkload(), 2), 0, hang_at="window")
    started = time.monotonic()
    record = run(layout, warmup_s=0.0)
    assert time.monotonic() - started < 15
    assert record["status"] == "failed" and "hung" in record["error"]
    assert record["failures"][0]["status"] == "hung" and record["failures"][0]["lanes"] == [0]
    assert_gone(record)


def test_client_that_hangs_at_start_up_hits_the_start_up_timeout():
    layout = with_lane(driver.layout_lanes(FakeWorkload(), 2), 1, hang_at="start-up")
    record = run(layout, startup_timeout_s=1.5)
    assert record["status"] == "failed" and "start-up" in record["error"] and "hung" in record["error"]
    assert_gone(record)


def test_client_error_at_start_up_names_the_client_and_the_error():
    layout = with_lane(driver.layout_lanes(FakeWorkload(), 2), 1, raise_at="start-up")
    record = run(layout)
    assert record["status"] == "failed"
    assert "lane 1" in record["error"] and "fake failure at start-up" in record["error"]
    assert_gone(record)


def test_fault_experiment_reports_every_client_then_the_next_configuration_runs(fake_mps):
    layout = driver.layout_lanes(FakeWorkload(), 2, fault_client=1)
    with driver.Sharing() as sharing:
        sharing.prepare(["mps"])
        first = sharing.daemon.pid
        record = run(layout, mode="mps", sharing=sharing)
        assert record["status"] == "fault"
        fates = {c["lane"]: c for c in record["fault"]["clients"]}
        assert fates[1]["injected"] and fates[1]["status"] == "errored"
        assert "illegal memory access" in fates[1]["detail"]
        assert fates[0]["status"] == "unaffected"
        assert record["recovery"] == {"daemon_restarted": True} and not mps._alive(first)
        after = run(driver.layout_lanes(FakeWorkload(), 2), mode="mps", sharing=sharing, trials=1)
        assert after["status"] == "ok", after["error"]
    assert_gone(record)


def test_fault_in_streams_mode_takes_down_every_lane_of_the_process():
    record = run(driver.layout_lanes(FakeWorkload(), 2, fault_client=0), mode="streams")
    assert record["status"] == "fault"
    assert [c["status"] for c in record["fault"]["clients"]] == ["errored", "errored"]
