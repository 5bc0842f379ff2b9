"""The overlap driver: spawns the clients of one configuration, runs its windows and trials, and reports.

A configuration is a mode (``mps``, ``timeslice``, ``streams``) and a lane layout: the N shared clients plus
the reference streams measured alone. Its processes are spawned once, build and capture before "ready", and
stay alive across trials; each trial runs every alone window and the shared window (in ABBA order across
trials), each a fixed-duration window the clients count steps in. The driver itself never creates a CUDA
context (it only spawns, signals and samples GPM through NVML).

Failure is part of the measurement: a client that errors, dies or hangs (no answer within the window's
duration plus ``window_timeout_s``) is reported with what happened to every other client; the configuration's
processes are torn down and, under MPS, the private daemon restarted so the next configuration starts clean.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from typing import Any

from . import gain, mps
from .client import LaneFactory, LaneSpec, client_main
from .metrics import GpmSampler

MODES = ("mps", "timeslice", "streams")
LAUNCHES = ("graph", "eager")
MAX_CLIENTS = 8  # the tool's range (MPS itself allows 48 clients per device)
DEFAULT_FACTORY = "mpskern.lanes:build_cuda_lane"


class ConfigError(ValueError):
    """A configuration that cannot be run (reported as a one-line usage error)."""


# --- layout ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    lanes: tuple[LaneSpec, ...]
    shared: tuple[int, ...]  # lane indices of the N clients, in client order
    reference_of: dict[int, int]  # shared lane -> the lane measured alone as its reference
    fault_client: int | None = None  # this shared client performs an illegal memory access (fault experiment)

    @property
    def references(self) -> list[int]:
        return sorted(set(self.reference_of.values()))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def layout_lanes(workload: Any, clients: int, *, kernels: Sequence[str] | None = None, split: bool = False,
                 thread_pct: int | Sequence[int] | None = None, launch: str = "graph", in_flight: int = 3,
                 fault_client: int | None = None) -> Layout:
    """The lanes of a configuration.

    Client i runs ``kernels[i % len(kernels)]`` (default: the workload's kernel). With ``split`` the batch of
    each kernel is divided among the clients running it. Each kernel's reference is the stream with the full
    batch and no thread limit. A shared client identical to it is measured alone as its own reference (STP
    divides each client by its own alone throughput, so a process that happens to run faster or slower, e.g.
    from where its buffers landed, does not move the gain); the other clients share an extra reference lane
    (its own process), so a reference never runs with a partitioned SM share.
    """
    if not 1 <= clients <= MAX_CLIENTS:
        raise ConfigError(f"--clients must be in 1..{MAX_CLIENTS}; got {clients}")
    if launch not in LAUNCHES:
        raise ConfigError(f"unknown launch {launch!r}; choose one of {', '.join(LAUNCHES)}")
    if in_flight < 1:
        raise ConfigError(f"in_flight must be >= 1; got {in_flight}")
    kernels = list(kernels or [workload.kernel])
    if len(kernels) > clients:
        raise ConfigError(f"--pair names {len(kernels)} streams but there are only {clients} clients")
    if thread_pct is None or isinstance(thread_pct, int):
        pcts = [thread_pct] * clients
    else:
        pcts = list(thread_pct)
        if len(pcts) != clients:
            raise ConfigError(f"--thread-pct gives {len(pcts)} percentages for {clients} clients")
    try:
        pcts = [None if p is None else mps.check_thread_pct(p) for p in pcts]
    except ValueError as exc:
        raise ConfigError(f"--thread-pct: {exc}") from None
    if fault_client is not None and not 0 <= fault_client < clients:
        raise ConfigError(f"--inject-fault names client {fault_client}; clients are 0..{clients - 1}")

    kernel_of = [kernels[i % len(kernels)] for i in range(clients)]
    batch_of: list[int] = [workload.batch] * clients
    if split:
        for kernel in dict.fromkeys(kernels):
            members = [i for i in range(clients) if kernel_of[i] == kernel]
            if workload.batch < len(members):
                raise ConfigError(f"--split: batch {workload.batch} cannot be divided among {len(members)} clients")
            for i, b in zip(members, _split(workload.batch, len(members)), strict=True):
                batch_of[i] = b
    lanes = [LaneSpec(index=i, role="shared", workload=dataclasses.replace(workload, kernel=kernel_of[i],
                                                                         batch=batch_of[i]),
                      launch=launch, thread_pct=pcts[i], seed=i, in_flight=in_flight, may_fault=fault_client == i)
             for i in range(clients)]
    reference_of: dict[int, int] = {}
    for kernel in dict.fromkeys(kernels):
        ref_workload = dataclasses.replace(workload, kernel=kernel)
        extra: int | None = None
        for i in range(clients):
            if kernel_of[i] != kernel:
                continue
            if lanes[i].workload == ref_workload and lanes[i].thread_pct is None:
                reference_of[i] = i  # its own reference: a process's placement luck cancels out of the ratio
                continue
            if extra is None:
                extra = len(lanes)
                lanes.append(LaneSpec(index=extra, role="reference", workload=ref_workload, launch=launch,
                                      seed=extra, in_flight=in_flight))
            reference_of[i] = extra
    return Layout(tuple(lanes), tuple(range(clients)), reference_of, fault_client)


# --- how a mode's clients share the GPU ---------------------------------------------------------------------

class Sharing:
    """The environment each mode gives its clients, the attach check, and recovery after a failure.

    ``mps``: a private daemon (``mps_policy="private"``, started on first use, restarted after a failure,
    stopped on close) or the already running one (``"external"``, never stopped). ``timeslice`` and
    ``streams``: clients are pointed at an empty pipe directory, so they cannot join any daemon.
    """

    def __init__(self, mps_policy: str = "private", binary: str | None = None) -> None:
        if mps_policy not in ("private", "external"):
            raise ConfigError(f"--mps must be private or external; got {mps_policy!r}")
        self.mps_policy = mps_policy
        self.binary = binary
        self.daemon: mps.MpsDaemon | mps.ExternalDaemon | None = None
        self._empty_dir: str | None = None

    def prepare(self, modes: Sequence[str]) -> None:
        """Start (or find) the daemon now, so an MPS problem is reported before any client is spawned."""
        if "mps" in modes:
            self._mps()

    def _mps(self) -> mps.MpsDaemon | mps.ExternalDaemon:
        if self.daemon is None:
            if self.mps_policy == "private":
                self.daemon = mps.MpsDaemon(self.binary)
            else:
                self.daemon = mps.ExternalDaemon.find(self.binary)
        if self.daemon.owned and not self.daemon.running:  # first use, or a restart that failed
            self.daemon.start()
        return self.daemon

    def env(self, mode: str, thread_pct: int | None) -> dict:
        if mode == "mps":
            return self._mps().client_env(thread_pct)
        if self._empty_dir is None:
            self._empty_dir = tempfile.mkdtemp(prefix="mpskern-nomps-")
        return mps.no_mps_env(self._empty_dir)

    def verify(self, mode: str, pids: Sequence[int], timeout: float) -> dict:
        if mode != "mps":
            return {"verified": None, "reason": f"mode {mode} runs without MPS"}
        return self._mps().verify_attached(pids, timeout)

    def recover(self, mode: str) -> dict:
        if mode != "mps" or self.daemon is None:
            return {"daemon_restarted": False, "reason": "no MPS daemon in this mode"}
        if not self.daemon.owned:
            return {"daemon_restarted": False, "reason": "the daemon is external: not ours to restart"}
        try:
            self.daemon.restart()
        except mps.MpsError as exc:  # the next configuration tries again, and fails with its own error
            return {"daemon_restarted": False, "reason": str(exc)}
        return {"daemon_restarted": True}

    def describe(self) -> dict | None:
        return self.daemon.describe() if self.daemon is not None else None

    def close(self) -> None:
        if self.daemon is not None and self.daemon.owned:
            self.daemon.stop()
        if self._empty_dir is not None:
            shutil.rmtree(self._empty_dir, ignore_errors=True)
            self._empty_dir = None

    def __enter__(self) -> Sharing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- client processes --------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str  # "ok" | "errored" | "killed" | "hung"
    payload: Any = None
    detail: str = ""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Client:
    """One spawned client process and its pipe."""

    def __init__(self, ctx: Any, number: int, specs: list[LaneSpec], factory: LaneFactory | str) -> None:
        self.number = number
        self.lanes = [s.index for s in specs]
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=client_main, args=(child, specs, factory),
                                   name=f"mpskern-client-{number}", daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        self.info: dict = {}
        self.kill_now = False  # hung, or not needed any more: no graceful stop

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: tuple) -> bool:
        try:
            self.conn.send(message)
            return True
        except (BrokenPipeError, OSError):
            return False

    def label(self) -> str:
        lanes = ",".join(map(str, self.lanes))
        return f"client process {self.number} (pid {self.pid}, lane{'s' if len(self.lanes) > 1 else ''} {lanes})"


def _gather(clients: Sequence[_Client], expect: str, timeout: float) -> dict[int, Outcome]:
    """Wait for one message from each client: ``expect`` (ok), an error report, its death, or the timeout."""
    pending = {c.number: c for c in clients}
    out: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            for number in pending:
                out[number] = Outcome("hung", detail=f"no answer within {timeout:.1f} s")
            break
        handles = [h for c in pending.values() for h in (c.conn, c.process.sentinel)]
        ready = set(wait_ready(handles, left))
        for number, c in list(pending.items()):
            if c.conn not in ready and c.process.sentinel not in ready:
                continue
            outcome = _receive(c, expect)
            if outcome is None:
                continue
            out[number] = outcome
            del pending[number]
    return out


def _receive(c: _Client, expect: str) -> Outcome | None:
    try:
        if c.conn.poll():
            kind, payload = c.conn.recv()
            if kind == expect:
                return Outcome("ok", payload)
            return Outcome("errored", payload, f"{payload['stage']}: {payload['message']}")
    except (EOFError, OSError):
        pass
    if c.process.is_alive():
        c.process.join(1.0)  # pipe closed: the process is on its way out
    if c.process.is_alive():
        return None
    return Outcome("killed", detail=_exit_text(c.process.exitcode))


def _shutdown(clients: Sequence[_Client], grace_s: float) -> None:
    """Stop every client: hung or failed ones at once, the others after a graceful "stop"."""
    for c in clients:
        if c.kill_now:
            c.process.kill()
        else:
            c.send(("stop", None))
    deadline = time.monotonic() + grace_s
    for c in clients:
        c.process.join(max(0.0, deadline - time.monotonic()))
    for c in clients:
        if c.process.is_alive():
            c.process.kill()
            c.process.join(5.0)
        c.conn.close()


class RunFailed(Exception):
    def __init__(self, message: str, failures: list[dict]) -> None:
        super().__init__(message)
        self.failures = failures


# --- one configuration --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOptions:
    mode: str = "mps"
    duration_s: float = 2.0  # each measurement window
    warmup_s: float = 0.5  # one unrecorded window of each kind before the trials
    trials: int = 3
    startup_timeout_s: float = 300.0  # spawn to ready (imports, CUDA start-up, build, compile, capture)
    window_timeout_s: float = 30.0  # grace past a window's end before a silent client counts as hung
    attach_timeout_s: float = 10.0
    shutdown_grace_s: float = 10.0

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1; got {self.trials}")
        if not self.duration_s > 0 or self.warmup_s < 0:
            raise ConfigError("--duration must be > 0 and --warmup >= 0")


def run(layout: Layout, options: RunOptions, sharing: Sharing, *, factory: LaneFactory | str = DEFAULT_FACTORY,
        sampler: GpmSampler | None = None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Run one configuration; returns its record (``status`` "ok", "failed" or "fault")."""
    options.check()
    if options.mode != "mps" and any(lane.thread_pct is not None for lane in layout.lanes):
        raise ConfigError("--thread-pct applies only to --mode mps")
    return _Run(layout, options, sharing, factory, sampler or GpmSampler(), log).execute()


class _Run:
    def __init__(self, layout: Layout, options: RunOptions, sharing: Sharing, factory: LaneFactory | str,
                 sampler: GpmSampler, log: Callable[[str], None]) -> None:
        self.layout, self.options, self.sharing = layout, options, sharing
        self.factory, self.sampler, self.log = factory, sampler, log
        self.clients: list[_Client] = []
        self.host: dict[int, _Client] = {}  # lane -> its process
        self.info: dict[int, dict] = {}  # lane -> what it reported at ready
        self.record: dict[str, Any] = {
            "mode": options.mode, "status": "ok", "error": None, "failures": [], "device": None,
            "lanes": [], "attach": None, "startup_s": None, "trials": [], "summary": {}, "fault": None,
            "recovery": None, "mps_daemon": None,
        }

    def execute(self) -> dict:
        o = self.options
        try:
            self._start()
            if self.layout.fault_client is not None:
                self._fault_window()
            else:
                self._trials()
        except RunFailed as failed:
            self.record["status"] = "failed"
            self.record["error"] = str(failed)
            self.record["failures"] = failed.failures
            self.log(f"{o.mode}: FAILED: {failed}")
        except BaseException:  # Ctrl-C, SIGTERM, a bug: no graceful stop (a client may be mid-window)
            for client in self.clients:
                client.kill_now = True
            raise
        finally:
            _shutdown(self.clients, o.shutdown_grace_s)
        if self.record["status"] != "ok":
            self.record["recovery"] = self.sharing.recover(o.mode)
        self.record["mps_daemon"] = self.sharing.describe() if o.mode == "mps" else None
        return self.record

    # -- start-up ---------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter per client: no inherited CUDA or torch state
        lanes = [dataclasses.replace(lane, env=self.sharing.env(self.options.mode, lane.thread_pct))
                 for lane in self.layout.lanes]
        groups = [lanes] if self.options.mode == "streams" else [[lane] for lane in lanes]
        for number, group in enumerate(groups):
            client = _Client(ctx, number, group, self.factory)
            self.clients.append(client)
            for lane in group:
                self.host[lane.index] = client

    def _start(self) -> None:
        o = self.options
        started = time.monotonic()
        self.log(f"{o.mode}: starting {len(self.layout.lanes)} lane(s) in "
                 f"{1 if o.mode == 'streams' else len(self.layout.lanes)} process(es)")
        self._spawn()
        # One client at a time allocates and captures. Under MPS all clients' memory comes from one server.
        # Built concurrently, the default stream's alone throughput sat at one of two levels per run (both
        # clients 49k or both 55k tokens/s; gain +31% or +24%) at equal clocks; built in turn, six runs in
        # a row stayed at one level (BENCHMARKS.md).
        outcomes: dict[int, Outcome] = {}
        for client in self.clients:
            if not client.send(("build", None)):
                outcomes[client.number] = _receive(client, "ready") or Outcome("killed", detail="pipe closed")
            else:
                outcomes.update(_gather([client], "ready", o.startup_timeout_s))
            if outcomes[client.number].status != "ok":
                break
        bad = {n: out for n, out in outcomes.items() if out.status != "ok"}
        if bad or len(outcomes) < len(self.clients):
            failures = self._failures(outcomes)
            first = failures[0]
            raise RunFailed(f"{first['client']} failed during start-up: {first['status']}: {first['detail']}",
                            failures)
        for client in self.clients:
            client.info = outcomes[client.number].payload
            for lane_index, lane_info in zip(client.lanes, client.info["lanes"], strict=True):
                self.info[lane_index] = lane_info
        self.record["startup_s"] = time.monotonic() - started
        self.record["lanes"] = [self._lane_record(lane) for lane in self.layout.lanes]
        self.record["device"] = self.info[0].get("device") if self.info else None
        self.log(f"{o.mode}: ready in {self.record['startup_s']:.1f} s")
        try:
            self.record["attach"] = self.sharing.verify(o.mode, [c.pid for c in self.clients], o.attach_timeout_s)
        except mps.MpsError as exc:
            raise RunFailed(f"attach check: {exc}", []) from None

    def _lane_record(self, lane: LaneSpec) -> dict:
        workload = lane.workload.as_dict()
        info = {k: v for k, v in self.info[lane.index].items() if k != "device"}
        host = self.host[lane.index]
        return {"index": lane.index, "role": lane.role, "workload": workload, "launch": lane.launch,
                "thread_pct": lane.thread_pct, "pid": host.pid, "built": host.info.get("built"), "info": info}

    def _failures(self, outcomes: dict[int, Outcome]) -> list[dict]:
        """Every client's fate, failed ones first (a client with no outcome yet was not waited for)."""
        rows = []
        for c in self.clients:
            out = outcomes.get(c.number)
            status = out.status if out else "not waited for"
            c.kill_now = status in ("hung", "not waited for")
            rows.append({"client": c.label(), "process": c.number, "lanes": c.lanes, "pid": c.pid, "status": status,
                         "detail": out.detail if out else ""})
        return sorted(rows, key=lambda r: {"ok": 2, "not waited for": 1}.get(r["status"], 0))

    # -- windows ----------------------------------------------------------------------------------------

    def _window(self, kind: str, lanes: list[int], duration: float, fault_lane: int | None = None
                ) -> tuple[dict, dict[int, Outcome]]:
        involved: dict[int, list[int]] = {}
        for lane in lanes:
            involved.setdefault(self.host[lane].number, []).append(lane)
        clients = [c for c in self.clients if c.number in involved]
        gpm_start = self.sampler.begin()
        t0 = time.monotonic()
        deadline = t0 + duration
        unreachable: dict[int, Outcome] = {}
        for c in clients:
            local = [c.lanes.index(lane) for lane in involved[c.number]]
            fault = None
            if fault_lane is not None and fault_lane in involved[c.number]:
                fault = {"lane": c.lanes.index(fault_lane), "at": t0 + duration / 2}
            if not c.send(("window", {"lanes": local, "deadline": deadline, "fault": fault})):
                unreachable[c.number] = _receive(c, "result") or Outcome("killed", detail="pipe closed")
        reachable = [c for c in clients if c.number not in unreachable]
        outcomes = {**unreachable, **_gather(reachable, "result", duration + self.options.window_timeout_s)}
        gpm = self.sampler.end(gpm_start)
        window: dict[str, Any] = {"kind": kind, "lanes": lanes, "duration_s": duration, "gpm": gpm, "clients": []}
        starts, finishes = [], []
        for c in clients:
            out = outcomes[c.number]
            if out.status != "ok":
                continue
            result = out.payload
            starts.append(result["t_start"])
            for lane, lane_result in zip(involved[c.number], result["lanes"], strict=True):
                finishes.append(lane_result["t_finish"])
                rates = gain.lane_rates(lane_result["steps"], lane_result["t_finish"] - result["t_start"],
                                        self.info[lane]["tokens_per_step"])
                window["clients"].append({"lane": lane, "pid": c.pid, **rates})
        window["start_skew_ms"] = gain.skew_ms(starts)
        window["finish_skew_ms"] = gain.skew_ms(finishes)
        return window, outcomes

    def _measured(self, kind: str, lanes: list[int], duration: float) -> dict:
        window, outcomes = self._window(kind, lanes, duration)
        if any(out.status != "ok" for out in outcomes.values()):
            failures = self._failures(outcomes)
            first = failures[0]
            raise RunFailed(f"{first['client']} {first['status']} during a {kind} window: {first['detail']}",
                            failures)
        return window

    def _trials(self) -> None:
        o, layout = self.options, self.layout
        plan = [("alone", [ref]) for ref in layout.references] + [("shared", list(layout.shared))]
        if o.warmup_s > 0:
            for _, lanes in plan:
                self._measured("warmup", lanes, o.warmup_s)
        for t in range(o.trials):
            order = plan if t % 2 == 0 else plan[::-1]  # ABBA: a slow drift (clocks, heat) favours neither side
            windows = [self._measured(kind, lanes, o.duration_s) for kind, lanes in order]
            rates = {kind: {c["lane"]: c for w in windows if w["kind"] == kind for c in w["clients"]}
                     for kind in ("alone", "shared")}
            numbers = gain.trial(rates["alone"], rates["shared"], layout.reference_of)
            self.record["trials"].append({"trial": t, "windows": windows, **numbers})
            self.log(f"{o.mode}: trial {t + 1}/{o.trials}: gain {numbers['gain']:+.1%}")
        self.record["summary"] = gain.summarize(self.record["trials"])

    # -- the fault experiment ---------------------------------------------------------------------------

    def _fault_window(self) -> None:
        """All shared clients run; one performs an illegal memory access half-way. Record every client's fate:
        the faulting one should be "errored" (the CUDA error), the others "unaffected", "errored", "killed"
        (died without a word, e.g. taken down with the MPS server) or "hung"."""
        o, faulty = self.options, self.layout.fault_client
        self.log(f"{o.mode}: fault window, client {faulty} faults after {o.duration_s / 2:.1f} s")
        window, outcomes = self._window("fault", list(self.layout.shared), o.duration_s, fault_lane=faulty)
        clients = []
        for lane in self.layout.shared:
            c = self.host[lane]
            out = outcomes[c.number]
            c.kill_now = out.status == "hung"
            injected = lane == faulty
            if out.status == "ok":
                status = "fault not observed" if injected else "unaffected"
            else:
                status = out.status
            clients.append({"lane": lane, "pid": c.pid, "process": c.number, "injected": injected,
                            "status": status, "detail": out.detail})
        self.record["status"] = "fault"
        self.record["fault"] = {"client": faulty, "window": window, "clients": clients}
        self.log(f"{o.mode}: " + ", ".join(f"client {r['lane']}{' (faulting)' if r['injected'] else ''}: "
                                            f"{r['status']}" for r in clients))
