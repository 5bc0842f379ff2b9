"""MPS daemon lifecycle on CPU, against a fake ``nvidia-cuda-mps-control`` put first on PATH: start, attach
check, quit, teardown on exceptions and signals, detection of a daemon someone else runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mpskern import mps
from mpskern.driver import Sharing
from mpskern.driver_fakes import FAKE_CLIENTS_FILE, leftover_daemons, write_fake_control_binary

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


@pytest.fixture
def fake_mps(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    binary = write_fake_control_binary(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    yield binary
    assert not leftover_daemons(), "a test left an MPS daemon behind"


def start_outside_daemon(binary, owner):
    """A daemon started outside the tool (as an admin, or an mpskern run that was killed, would leave one)."""
    root = tempfile.mkdtemp(prefix="mpskern-ext-")
    pipe, log = os.path.join(root, "pipe"), os.path.join(root, "log")
    os.mkdir(pipe)
    os.mkdir(log)
    env = {**os.environ, mps.PIPE_ENV: pipe, mps.LOG_ENV: log, mps.OWNER_ENV: str(owner)}
    subprocess.run([str(binary), "-d"], env=env, check=True)
    for _ in range(500):
        found = [d for d in mps._control_daemon_processes() if d.pipe_dir == pipe]
        if found and os.path.exists(os.path.join(pipe, "control")):
            break
        mps.time.sleep(0.01)
    else:
        raise AssertionError("fake daemon did not come up")

    def quit_it():
        mps.run_control(pipe, "quit", binary=str(binary))
        assert mps._wait_gone(found[0].pid, 10)
        shutil.rmtree(root)

    return found[0], quit_it


@pytest.fixture
def external_daemon(fake_mps):
    # owned by this session, so a concurrent test session does not mistake it for a foreign daemon
    daemon, quit_it = start_outside_daemon(fake_mps, owner=os.getpid())
    yield daemon
    quit_it()


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(mps.MpsError, match="nvidia-cuda-mps-control not found on PATH"):
        mps.control_binary()
    with pytest.raises(mps.MpsError, match="not found"):
        mps.MpsDaemon()


def test_private_daemon_starts_in_its_own_dirs_and_quits(fake_mps):
    with mps.MpsDaemon() as daemon:
        pid, root = daemon.pid, daemon.root
        assert mps._alive(pid)
        assert daemon.pipe_dir.startswith(root) and daemon.log_dir.startswith(root)
        assert os.path.exists(os.path.join(daemon.pipe_dir, "control"))
        env = daemon.client_env(25)
        assert env[mps.PIPE_ENV] == daemon.pipe_dir and env[mps.LOG_ENV] == daemon.log_dir
        assert env[mps.THREAD_PCT_ENV] == "25"
        assert daemon.client_env()[mps.THREAD_PCT_ENV] is None  # unset, not inherited
        assert "Startup" in daemon.log_tail()
    assert not mps._alive(pid)
    assert not os.path.exists(root)


def test_daemon_is_stopped_when_the_body_raises(fake_mps):
    with pytest.raises(RuntimeError, match="boom"):
        with mps.MpsDaemon() as daemon:
            pid = daemon.pid
            raise RuntimeError("boom")
    assert not mps._alive(pid)


def test_daemon_that_ignores_quit_is_killed(fake_mps, monkeypatch):
    monkeypatch.setenv("MPSKERN_FAKE_MPS_IGNORE_QUIT", "1")
    daemon = mps.MpsDaemon(stop_timeout=0.5).start()
    pid = daemon.pid
    daemon.stop()
    assert not mps._alive(pid)


def test_restart_gives_a_fresh_daemon(fake_mps):
    with mps.MpsDaemon() as daemon:
        first_pid, first_root = daemon.pid, daemon.root
        daemon.restart()
        assert daemon.pid != first_pid and daemon.root != first_root
        assert not mps._alive(first_pid) and not os.path.exists(first_root)
        assert daemon.starts == 2


def test_verify_attached_uses_the_daemons_client_list(fake_mps):
    with mps.MpsDaemon() as daemon:
        Path(daemon.pipe_dir, FAKE_CLIENTS_FILE).write_text(f"{os.getpid()}\n")
        check = daemon.verify_attached([os.getpid()])
        assert check["verified"] and "control" in check["sources"]
        with pytest.raises(mps.MpsError, match=r"\[1\] are not attached"):
            daemon.verify_attached([os.getpid(), 1], timeout=0.2)


def test_thread_percentage_is_checked():
    assert mps.check_thread_pct(100) == 100
    for bad in (0, 101):
        with pytest.raises(ValueError, match="1..100"):
            mps.check_thread_pct(bad)


def test_running_daemon_is_detected_used_and_never_stopped(external_daemon, monkeypatch):
    found = mps.find_running_daemons()
    assert [d.pipe_dir for d in found] == [external_daemon.pipe_dir]
    with pytest.raises(mps.MpsError, match="already running.*--mps external"):
        mps.MpsDaemon().start()
    with Sharing("external") as sharing:
        sharing.prepare(["mps"])
        assert sharing.describe()["kind"] == "external"
        assert sharing.env("mps", None)[mps.PIPE_ENV] == external_daemon.pipe_dir
        assert sharing.recover("mps")["daemon_restarted"] is False
    assert mps._alive(external_daemon.pid)  # still running: not ours to stop


def test_leftover_of_a_killed_run_is_named(fake_mps):
    gone = subprocess.Popen(["true"])
    gone.wait()
    daemon, quit_it = start_outside_daemon(fake_mps, owner=gone.pid)
    try:
        with pytest.raises(mps.MpsError, match=f"left over by mpskern process {gone.pid}"):
            mps.MpsDaemon().start()
    finally:
        quit_it()


def test_external_mode_without_a_daemon_is_an_error(fake_mps):
    with pytest.raises(mps.MpsError, match="no running MPS control daemon"):
        mps.ExternalDaemon.find()


def test_no_mps_env_points_clients_at_an_empty_dir(tmp_path):
    env = mps.no_mps_env(str(tmp_path))
    assert env[mps.PIPE_ENV] == str(tmp_path) and env[mps.THREAD_PCT_ENV] is None


_HOLD_DAEMON = """
import signal, sys
from mpskern import mps
with mps.MpsDaemon() as d:
    print(d.pid, d.root, flush=True)
    signal.pause()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_tears_the_daemon_down(fake_mps, sig):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_DAEMON], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        pid, root = proc.stdout.readline().split()
        assert mps._alive(int(pid))
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not mps._alive(int(pid)), f"daemon survived {sig.name}"
    assert not os.path.exists(root)
