"""The MPS control daemon: a private one the tool starts and always stops, or a running one it only uses.

A private daemon lives in its own pipe and log directories (under a temp dir), so it cannot collide with a
daemon someone else runs, and its clients are the only ones it serves. It is quit and its directories removed
on normal exit, on an exception, on SIGINT/SIGTERM/SIGHUP (through the unwinding they cause) and at
interpreter exit; teardown runs with those signals blocked so a second Ctrl-C cannot leave it half done.
A daemon that was already running is detected and used only when asked (``ExternalDaemon``); it is never
stopped. Before a number is trusted, ``verify_attached`` checks that every client really joined the daemon.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CONTROL_BINARY = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
THREAD_PCT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
OWNER_ENV = "MPSKERN_OWNER"  # marks a private daemon with the pid of the mpskern process that started it
_TEARDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_POLL_S = 0.02  # how often to look at an external process's state while waiting on it (no event to wait on)


class MpsError(RuntimeError):
    """MPS is missing, misbehaving, or its clients are not attached."""


def control_binary() -> str:
    path = shutil.which(CONTROL_BINARY)
    if path is None:
        raise MpsError(
            f"{CONTROL_BINARY} not found on PATH: MPS is not installed here (use --mode timeslice or streams)"
        )
    return path


def run_control(pipe_dir: str, commands: str, *, binary: str | None = None, timeout: float = 15.0) -> str:
    """Send control commands (one per line) to the daemon serving ``pipe_dir``; returns its answer."""
    env = {**os.environ, PIPE_ENV: pipe_dir}
    try:
        proc = subprocess.run(
            [binary or control_binary()], input=commands + "\n", capture_output=True, text=True, env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise MpsError(f"MPS control command {commands!r} got no answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
        raise MpsError(f"MPS control command {commands!r} failed: {detail}")
    return proc.stdout


def _ints(text: str) -> list[int]:
    return [int(tok) for tok in text.split() if tok.isdigit()]


# --- processes, read from /proc (Linux) --------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:  # another user's process: its environment is not readable
        return None
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4 (ppid), after "pid (comm)"
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = ""
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit (pidfd where available)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        fd = None
    deadline = time.monotonic() + timeout
    try:
        while _alive(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd is not None:
                select.select([fd], [], [], min(left, 1.0))
            else:
                time.sleep(min(left, _POLL_S))
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _kill(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left."""
    pids = [p for p in pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        pids = [p for p in pids if not _wait_gone(p, timeout)]
        if not pids:
            return


# --- detection ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunningDaemon:
    pipe_dir: str
    pid: int | None  # None: answered on its pipe directory but runs outside our PID namespace
    owner: int | None = None  # the mpskern process that started it (MPSKERN_OWNER in its environment)


def _control_daemon_processes() -> list[RunningDaemon]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if "-d" in argv and any(os.path.basename(a) == CONTROL_BINARY for a in argv):
            env = _environ(int(entry.name)) or {}
            owner = env.get(OWNER_ENV, "")
            out.append(RunningDaemon(env.get(PIPE_ENV) or DEFAULT_PIPE_DIR, int(entry.name),
                                     int(owner) if owner.isdigit() else None))
    return out


def find_running_daemons(binary: str | None = None) -> list[RunningDaemon]:
    """MPS control daemons already running that this process does not manage.

    A daemon process seen in /proc counts; so does one answering on the default (or $CUDA_MPS_PIPE_DIRECTORY)
    pipe directory, which catches a daemon in another PID namespace sharing /tmp. The private daemon of
    another live mpskern process does not count (that run manages it); one whose mpskern owner is gone
    (killed with SIGKILL) does, so a leftover is named rather than silently shared.
    """
    ours = {d.pipe_dir for d in list(_LIVE)}

    def foreign(d: RunningDaemon) -> bool:
        managed_elsewhere = d.owner is not None and d.owner != os.getpid() and _alive(d.owner)
        return d.pipe_dir not in ours and not managed_elsewhere

    found = {d.pipe_dir: d for d in _control_daemon_processes() if foreign(d)}
    binary = binary or shutil.which(CONTROL_BINARY)
    for pipe_dir in {os.environ.get(PIPE_ENV) or DEFAULT_PIPE_DIR} - found.keys() - ours:
        if binary and os.path.exists(os.path.join(pipe_dir, "control")):
            with contextlib.suppress(MpsError):
                run_control(pipe_dir, "get_server_list", binary=binary, timeout=5.0)
                found[pipe_dir] = RunningDaemon(pipe_dir, None)
    return list(found.values())


def describe(daemon: RunningDaemon) -> str:
    pid = f"pid {daemon.pid}, " if daemon.pid else ""
    leftover = f", left over by mpskern process {daemon.owner}" if daemon.owner else ""
    return f"{pid}pipe directory {daemon.pipe_dir}{leftover}"


# --- the daemons -------------------------------------------------------------------------------------------

class _Daemon:
    """What both kinds of daemon answer: client environment, servers, clients, attach verification."""

    owned = False
    pipe_dir: str
    log_dir: str | None

    def __init__(self, binary: str | None) -> None:
        self.binary = binary or control_binary()

    def control(self, commands: str, timeout: float = 15.0) -> str:
        return run_control(self.pipe_dir, commands, binary=self.binary, timeout=timeout)

    def client_env(self, thread_pct: int | None = None) -> dict[str, str | None]:
        """Environment a client needs to join this daemon (None: variable to unset)."""
        env: dict[str, str | None] = {PIPE_ENV: self.pipe_dir, THREAD_PCT_ENV: None}
        if self.log_dir:
            env[LOG_ENV] = self.log_dir
        if thread_pct is not None:
            env[THREAD_PCT_ENV] = str(check_thread_pct(thread_pct))
        return env

    def server_pids(self) -> list[int]:
        return _ints(self.control("get_server_list"))

    def client_pids(self) -> set[int]:
        pids: set[int] = set()
        for server in self.server_pids():
            pids.update(_ints(self.control(f"get_client_list {server}")))
        return pids

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_dir:
            return ""
        try:
            text = Path(self.log_dir, "control.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def verify_attached(self, pids: Iterable[int], timeout: float = 10.0) -> dict:
        """Check every pid is an MPS client (daemon's client list, else NVML's MPS process list).

        The clients have created their contexts by the time this runs, so they are normally listed at once;
        the short retry covers a server still registering them.
        """
        wanted = set(pids)
        deadline = time.monotonic() + timeout
        while True:
            seen, sources, errors = set(), [], []
            try:
                seen |= self.client_pids()
                sources.append("control")
            except MpsError as exc:
                errors.append(str(exc))
            if not wanted <= seen:
                try:
                    from . import device_info

                    seen |= device_info.mps_client_pids()
                    sources.append("nvml")
                except Exception as exc:  # no NVML (CPU test machines) or no MPS list: the control answer stands
                    errors.append(f"NVML: {exc}")
            missing = wanted - seen
            if not missing:
                return {"verified": True, "pids": sorted(wanted), "sources": sources}
            if time.monotonic() >= deadline:
                detail = "; ".join([f"listed clients: {sorted(seen) or 'none'}", *errors])
                log = self.log_tail()
                raise MpsError(
                    f"client process(es) {sorted(missing)} are not attached to the MPS daemon at {self.pipe_dir} "
                    f"({detail}){'; control log: ' + log if log else ''}"
                )
            time.sleep(_POLL_S * 5)


class ExternalDaemon(_Daemon):
    """A daemon someone else runs: used (``--mps external``), never stopped or restarted."""

    def __init__(self, running: RunningDaemon, binary: str | None = None) -> None:
        super().__init__(binary)
        self.pipe_dir = running.pipe_dir
        self.pid = running.pid
        self.log_dir = None

    @classmethod
    def find(cls, binary: str | None = None) -> ExternalDaemon:
        binary = binary or control_binary()
        running = find_running_daemons(binary)
        wanted = os.environ.get(PIPE_ENV)
        if wanted:
            running = [d for d in running if d.pipe_dir == wanted]
        if not running:
            where = wanted or f"{DEFAULT_PIPE_DIR} or any {CONTROL_BINARY} process"
            raise MpsError(f"--mps external: no running MPS control daemon found ({where}); start one, "
                           "or let the tool run its own with --mps private")
        if len(running) > 1:
            raise MpsError("--mps external: several MPS daemons are running ("
                           + "; ".join(describe(d) for d in running) + f"); pick one with {PIPE_ENV}")
        return cls(running[0], binary)

    def describe(self) -> dict:
        return {"kind": "external", "pipe_dir": self.pipe_dir, "pid": self.pid}


class MpsDaemon(_Daemon):
    """A private MPS control daemon in its own pipe/log directories. Use as a context manager."""

    owned = True

    def __init__(self, binary: str | None = None, *, start_timeout: float = 30.0, stop_timeout: float = 15.0) -> None:
        super().__init__(binary)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.root: str | None = None
        self.pipe_dir = ""
        self.log_dir = None
        self.pid: int | None = None
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.root is not None

    def describe(self) -> dict:
        return {"kind": "private", "pipe_dir": self.pipe_dir, "log_dir": self.log_dir, "pid": self.pid,
                "starts": self.starts}

    def start(self) -> MpsDaemon:
        if self.running:
            return self
        others = find_running_daemons(self.binary)
        if others:
            raise MpsError("an MPS control daemon is already running (" + "; ".join(describe(d) for d in others)
                           + "): measure through it with --mps external, or stop it first")
        self.root = tempfile.mkdtemp(prefix="mpskern-mps-")
        self.pipe_dir = os.path.join(self.root, "pipe")
        self.log_dir = os.path.join(self.root, "log")
        os.mkdir(self.pipe_dir)
        os.mkdir(self.log_dir)
        _LIVE.add(self)
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        self.starts += 1
        return self

    def _launch(self) -> None:
        env = {**os.environ, PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir, OWNER_ENV: str(os.getpid())}
        env.pop(THREAD_PCT_ENV, None)  # a percentage in our own environment must not become the daemon's default
        try:
            proc = subprocess.run([self.binary, "-d"], env=env, capture_output=True, text=True,
                                  timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise MpsError(f"{CONTROL_BINARY} -d did not return in {self.start_timeout:.0f} s") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip() or f"exit code {proc.returncode}"
            raise MpsError(f"could not start the MPS control daemon: {detail}")
        # `-d` returns once it has forked. Nothing signals that the daemon is ready for clients, so ask it
        # until it answers.
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            mine = [d.pid for d in _control_daemon_processes() if d.pipe_dir == self.pipe_dir]
            if mine:
                self.pid = mine[0]
                try:
                    self.control("get_server_list", timeout=5.0)
                    return
                except MpsError as exc:
                    last_error = exc
            if time.monotonic() >= deadline:
                log = self.log_tail()
                raise MpsError(f"the MPS control daemon did not come up in {self.start_timeout:.0f} s"
                               f"{' (' + str(last_error) + ')' if last_error else ''}"
                               f"{'; control log: ' + log if log else ''}")
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """Quit the daemon (kill it and its servers if quitting fails) and remove its directories."""
        if not self.running:
            return
        with signals_blocked():
            try:
                # a start that failed half way may have left a daemon whose pid we never learned
                pids = [self.pid] if self.pid else [
                    d.pid for d in _control_daemon_processes() if d.pipe_dir == self.pipe_dir]
                for pid in filter(_alive, pids):
                    servers = set(_children(pid))
                    with contextlib.suppress(MpsError):
                        servers.update(self.server_pids())
                    with contextlib.suppress(MpsError):
                        self.control("quit", timeout=self.stop_timeout)
                    if not _wait_gone(pid, self.stop_timeout):
                        _kill([pid])
                    _kill(servers)
            finally:
                shutil.rmtree(self.root, ignore_errors=True)
                _LIVE.discard(self)
                self.root = None
                self.pid = None

    def restart(self) -> None:
        """A fresh daemon (new directories): after a client fault the old server may be unusable."""
        self.stop()
        self.start()

    def __enter__(self) -> MpsDaemon:
        self._signals = terminate_on_signals()
        self._signals.__enter__()
        try:
            return self.start()
        except BaseException:
            self._signals.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self._signals.__exit__(*exc)


def check_thread_pct(pct: int) -> int:
    if not 1 <= int(pct) <= 100:
        raise ValueError(f"active thread percentage must be in 1..100; got {pct}")
    return int(pct)


def no_mps_env(empty_dir: str) -> dict[str, str | None]:
    """Environment that keeps a client off every MPS daemon: its pipe directory is an empty directory.

    Without it, a client of a `timeslice` run would silently join a daemon running on the default pipe
    directory and measure MPS instead.
    """
    return {PIPE_ENV: empty_dir, LOG_ENV: empty_dir, THREAD_PCT_ENV: None}


# --- teardown on exit and signals --------------------------------------------------------------------------

_LIVE: set[MpsDaemon] = set()


@atexit.register
def _stop_live_daemons() -> None:
    for daemon in list(_LIVE):
        daemon.stop()


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (they are delivered then)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _TEARDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Make SIGTERM and SIGHUP unwind the stack like Ctrl-C does, so `with`/`finally` teardown runs.

    Handlers someone else installed are left alone; only the main thread can install handlers.
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                installed[sig] = signal.signal(sig, _raise_exit)
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)
