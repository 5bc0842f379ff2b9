"""The overlap CLI: defaults in --help, one-line errors with exit code 2 for bad input and environments, the
table and record of a run (CPU stand-in lanes), and Ctrl-C in the middle of a measurement."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpskern import cli, device_info, driver, mps, overlap, results
from mpskern.driver_fakes import FakeWorkload, leftover_daemons

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


def cli_run(*args, env=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mpskern.overlap", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def gpu_visible() -> bool:
    try:
        device_info.visible_device_handle()
        return True
    except device_info.NoGpuError:
        return False


def test_help_names_the_defaults():
    out = cli_run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for default in ("Qwen2.5-0.5B", "(default: 512)", "(default: attn)", "(default: torch)", "(default: mps)",
                    "(default: 2)", "(default: graph)", "(default: 3)", "(default: 2.0)"):
        assert default in text, default


@pytest.mark.parametrize("args, message", [
    (["--model", "Qwen9-1T"], "unknown model 'Qwen9-1T'"),
    (["--clients", "9"], "--clients must be in 1..8"),
    (["--ctx", "100000000"], "over the memory budget"),
    (["--kernel", "conv"], "unknown kernel 'conv'"),
    (["--pair", "attn,conv"], "unknown kernel 'conv'"),
    (["--mode", "fastest"], "unknown mode 'fastest'"),
    (["--thread-pct", "120"], "1..100"),
    (["--thread-pct", "50", "--mode", "timeslice"], "only to --mode mps"),
    (["--inject-fault", "3"], "clients are 0..1"),
    (["--split", "--batch", "1"], "cannot be divided"),
    (["--batch", "many"], "invalid int value"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--mps", "external", "--mode", "streams"], "--mps external needs --mode mps"),
    (["--shape", "896,4864,14"], "expected hidden,intermediate,heads,kv_heads,head_dim,layers"),
    (["--shape", "896,4864,14,3,64,24"], "must be a multiple of kv_heads"),
    (["--shape", "896,4864,14,2,64,24,relu"], "act must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert overlap.main(args) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpskern: error: "), out.err
    assert message in lines[0]
    assert out.out == ""


def test_custom_shape_flag_builds_the_workload():
    args = overlap.build_parser().parse_args(["--shape", "1024,2816,16,4,64,12,gelu_tanh", "--kernel", "layer"])
    config = overlap.base_workload(args, 20.0)
    shape = config.model_shape()
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.layers) == (
        1024, 2816, 16, 4, 64, 12)
    assert shape.act == "gelu_tanh" and config.as_dict()["model"] == "custom"


def test_bad_input_in_a_real_process_has_no_traceback():
    out = cli_run("--model", "Qwen9-1T")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("mpskern: error: unknown model 'Qwen9-1T'") and len(out.stderr.splitlines()) == 1


def test_missing_mps_binary_is_one_line_and_exit_2(tmp_path):
    out = cli_run("--mode", "mps", env={"PATH": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip() == ("mpskern: error: nvidia-cuda-mps-control not found on PATH: MPS is not installed "
                                  "here (use --mode timeslice or streams)")


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible here")
def test_no_gpu_is_one_line_and_exit_2():
    out = cli_run("--mode", "timeslice")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpskern: error: no NVIDIA GPU visible")


def test_errors_leave_no_daemon_behind():
    cli_run("--clients", "9")
    assert not leftover_daemons()


def test_memory_check_names_the_need_and_the_free_memory():
    args = overlap.build_parser().parse_args(["--clients", "8", "--ctx", "32768", "--batch", "256"])
    layout = overlap.make_layout(args, overlap.DEFAULT_BUDGET_GIB)
    with pytest.raises(overlap.UsageError, match=r"too large for GPU memory: 8 streams in 8 processes get 7.88 GiB "
                                                 r"each of the 79.0 GiB free, and .* one layer needs 8.07 GiB"):
        overlap.fit_to_memory(args, layout, ["mps"], int(79 * 2**30))
    args.memory_budget = 9.0  # explicit: each stream fits its budget, all eight do not fit the GPU
    with pytest.raises(overlap.UsageError, match=r"8 streams in 8 processes need 7\d.\d GiB, 79.0 GiB is free"):
        overlap.fit_to_memory(args, overlap.make_layout(args, 9.0), ["mps"], int(79 * 2**30))


def test_memory_budget_shrinks_to_the_free_memory_share():
    args = overlap.build_parser().parse_args(["--clients", "8"])
    layout = overlap.fit_to_memory(args, overlap.make_layout(args, 20.0), ["mps"], int(79 * 2**30))
    assert layout.lanes[0].workload.memory_budget_gb == pytest.approx((0.9 * 79 - 8) / 8, abs=0.01)
    args = overlap.build_parser().parse_args([])
    layout = overlap.fit_to_memory(args, overlap.make_layout(args, 20.0), ["mps"], int(79 * 2**30))
    assert layout.lanes[0].workload.memory_budget_gb == overlap.DEFAULT_BUDGET_GIB


def test_mpskern_dispatcher(capsys):
    assert cli.main(["--help"]) == 0 and "overlap" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["sweep-all"]) == 2
    assert "unknown verb 'sweep-all'" in capsys.readouterr().err
    assert cli.main(["overlap", "--clients", "0"]) == 2
    assert capsys.readouterr().err.strip() == "mpskern: error: --clients must be in 1..8; got 0"


# --- a whole measurement on CPU stand-ins ---------------------------------------------------------------------


def test_measure_prints_a_table_and_writes_a_valid_record(fake_mps, tmp_path):
    args = overlap.build_parser().parse_args(
        ["--mode", "mps,timeslice,streams", "--trials", "2", "--duration", "0.2", "--warmup", "0", "-q"])
    layout = driver.layout_lanes(FakeWorkload(), 2)
    record = overlap.measure(args, layout, overlap.check_modes(args), {"name": "fake GPU", "driver_version": "1"},
                             factory="mpskern.driver_fakes:build_fake_lane", argv=["mpskern", "overlap"])
    results.validate_record(record)
    assert [r["mode"] for r in record["runs"]] == ["mps", "timeslice", "streams"]
    assert record["runs"][0]["mps_daemon"]["kind"] == "private"
    table = overlap.format_table(record)
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in driver.MODES}
    assert set(rows) == set(driver.MODES)
    assert "%" in rows["mps"] and "GPM n/a" in table and "fake GPU" in table
    path = results.write_json_atomic(tmp_path / "out.json", record)
    assert json.loads(path.read_text())["schema"] == results.SCHEMA


_INTERRUPTED_RUN = """
import sys
from mpskern import driver, overlap
from mpskern.driver_fakes import FakeWorkload

if __name__ == "__main__":
    args = overlap.build_parser().parse_args(["--mode", "mps", "--duration", "60", "--warmup", "0"])
    log = lambda msg: print(msg, flush=True)
    overlap.measure(args, driver.layout_lanes(FakeWorkload(), 2), ["mps"], {}, log=log,
                    factory="mpskern.driver_fakes:build_fake_lane")
"""


def _client_processes(pid):
    """Spawned clients of ``pid`` (not multiprocessing's resource tracker, which exits on its own later)."""
    return [c for c in mps._children(pid) if any("spawn_main" in arg for arg in mps._cmdline(c))]


def test_ctrl_c_mid_window_stops_clients_and_daemon(fake_mps, tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED_RUN)
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        for line in proc.stdout:
            if "ready" in line:
                break
        daemons = [d.pid for d in mps._control_daemon_processes() if d.owner == proc.pid]
        clients = _client_processes(proc.pid)
        assert daemons and clients
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    for pid in daemons + clients:
        assert not mps._alive(pid), f"process {pid} survived Ctrl-C"
