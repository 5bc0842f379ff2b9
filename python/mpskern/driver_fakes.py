"""CPU stand-ins for testing the driver and the MPS lifecycle without a GPU. Not used in measurements.

- ``FakeWorkload`` / ``build_fake_lane``: a lane whose "step" is a sleep (so N processes overlap perfectly and
  the expected gain is N - 1), with switches to die, hang or raise at start-up or in a window, and a fault
  that makes its next sync raise, like a sticky CUDA error.
- ``write_fake_control_binary``: an ``nvidia-cuda-mps-control`` look-alike (a Python script) that
  daemonises with ``-d``, serves ``quit``, ``get_server_list`` and ``get_client_list`` on a unix socket in
  $CUDA_MPS_PIPE_DIRECTORY, and lists as clients the fake lanes that registered with it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import LaneSpec

FAKE_CLIENTS_FILE = "fake_clients"  # in the pipe directory: pids of fake lanes that "attached"


@dataclass(frozen=True)
class FakeWorkload:
    kernel: str = "attn"
    batch: int = 64
    step_s: float = 0.002  # fixed cost of a step
    per_token_s: float = 0.0  # plus this per sequence (so --split makes steps cheaper)
    build_s: float = 0.0  # time to build the lane (allocation and capture in a real one)
    attach: bool = True  # register with a (fake) MPS daemon when one is configured
    die_at: str | None = None  # "start-up" | "window": os._exit(3) there
    hang_at: str | None = None  # "start-up" | "window": block forever there
    raise_at: str | None = None  # "start-up" | "window": raise RuntimeError there

    def as_dict(self) -> dict:
        return asdict(self)


def _misbehave(w: FakeWorkload, stage: str) -> None:
    if w.die_at == stage:
        os._exit(3)
    if w.hang_at == stage:
        threading.Event().wait()
    if w.raise_at == stage:
        raise RuntimeError(f"fake failure at {stage}")


class FakeLane:
    def __init__(self, spec: LaneSpec) -> None:
        self.spec = spec
        self.w: FakeWorkload = spec.workload
        self.faulted = False
        self._register()
        time.sleep(self.w.build_s)
        _misbehave(self.w, "start-up")

    def _register(self) -> None:
        pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        if self.w.attach and pipe and os.path.exists(os.path.join(pipe, "control")):
            with open(os.path.join(pipe, FAKE_CLIENTS_FILE), "a") as f:
                f.write(f"{os.getpid()}\n")

    def prepare(self) -> None:
        pass

    def launch(self) -> None:
        _misbehave(self.w, "window")
        time.sleep(self.w.step_s + self.w.per_token_s * self.w.batch)

    def fence(self) -> None:
        return None

    def _check(self) -> None:
        if self.faulted:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")

    def done(self, token: None) -> bool:
        self._check()
        return True

    def wait(self, token: None) -> None:
        self._check()

    def synchronize(self) -> None:
        self._check()

    def inject_fault(self) -> None:
        self.faulted = True

    def describe(self) -> dict:
        return {"tokens_per_step": self.w.batch, "bytes_per_step": 0, "flops_per_step": 0, "layers": 1,
                "op_backends": {"fake": "cpu"}, "launch": self.spec.launch,
                "kernels": {"available": False, "reason": "fake lane"},
                "device": {"name": "fake CPU lane", "sms": 0},
                # what MPS would have seen: lets tests check each client got its mode's environment
                "mps_env": {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY",
                                                            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}}


def build_fake_lane(spec: LaneSpec) -> FakeLane:
    return FakeLane(spec)


_CONTROL_SCRIPT = r'''
import os, socket, sys

PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
LOG = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
CONTROL = os.path.join(PIPE, "control")
IGNORE_QUIT = os.environ.get("MPSKERN_FAKE_MPS_IGNORE_QUIT") == "1"


def recv_all(sock):
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def log(line):
    with open(os.path.join(LOG, "control.log"), "a") as f:
        f.write(line + "\n")


def clients():
    try:
        lines = open(os.path.join(PIPE, "fake_clients")).read().split()
    except OSError:
        return []
    alive = []
    for pid in map(int, lines):
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def answer(command):
    words = command.split()
    if not words:
        return ""
    if words[0] == "quit":
        return "QUIT"
    if words[0] == "get_server_list":
        return str(os.getpid()) if clients() else ""
    if words[0] == "get_client_list":
        return "\n".join(map(str, clients()))
    return "unknown command " + words[0]


def daemon():
    if os.fork():
        os._exit(0)  # like the real one: -d returns once the daemon runs
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    server = socket.socket(socket.AF_UNIX)
    server.bind(CONTROL)
    server.listen()
    log("Startup")
    while True:
        conn, _ = server.accept()
        replies = [answer(line) for line in recv_all(conn).decode().splitlines()]
        quit_now = "QUIT" in replies and not IGNORE_QUIT
        conn.sendall("\n".join(r for r in replies if r and r != "QUIT").encode() + b"\n")
        conn.close()
        if quit_now:
            log("Shutdown")
            os.unlink(CONTROL)
            os._exit(0)


def client():
    if not os.path.exists(CONTROL):
        print("Cannot find MPS control daemon process", file=sys.stderr)
        sys.exit(1)
    s = socket.socket(socket.AF_UNIX)
    s.connect(CONTROL)
    s.sendall(sys.stdin.read().encode())
    s.shutdown(socket.SHUT_WR)
    sys.stdout.write(recv_all(s).decode())


if __name__ == "__main__":
    daemon() if "-d" in sys.argv[1:] else client()
'''


def leftover_daemons() -> list:
    """MPS daemons an mpskern process started that are still running although that process is gone, or that
    this process started and did not stop: what a test must not leave behind. (Daemons of concurrent runs,
    e.g. another test session on the same machine, are theirs to stop.)"""
    from .mps import _alive, _control_daemon_processes

    return [d for d in _control_daemon_processes()
            if d.owner is not None and (d.owner == os.getpid() or not _alive(d.owner))]


def write_fake_control_binary(directory: str | os.PathLike) -> Path:
    """Write the fake ``nvidia-cuda-mps-control`` into ``directory`` (put it first on PATH to use it)."""
    path = Path(directory) / "nvidia-cuda-mps-control"
    path.write_text(f"#!{sys.executable}\n{_CONTROL_SCRIPT}")
    path.chmod(0o755)
    return path
