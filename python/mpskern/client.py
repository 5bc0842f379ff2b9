"""The body of a client process: build its lanes, report ready, then run the windows the driver asks for.

A *lane* is one kernel stream with its own launch queue (a CUDA stream). A client process hosts one lane
(modes ``mps`` and ``timeslice``) or all of them (mode ``streams``). Everything slow (imports, CUDA start-up,
allocation, compilation, graph capture, warm-up) happens before "ready", so a window measures only steps.

A window runs every lane it names until a deadline on the system-wide monotonic clock, keeping at most
``in_flight`` steps queued per lane: the GPU never starves, and the host never runs more than a few steps
ahead, so "steps done by the deadline" is what the GPU did in the window rather than what the CPU queued.
Step counts and times go back to the driver, which turns them into throughput.

Lanes come from a factory (``LaneSpec -> Lane``) so the same orchestration runs real CUDA streams
(`mpskern.lanes`) or CPU stand-ins in the tests (`mpskern.driver_fakes`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol


@dataclass(frozen=True)
class LaneSpec:
    """One kernel stream of a run: what to build, and how it is launched and shared."""
    index: int
    role: str  # "shared": one of the N clients; "reference": a stream measured only alone
    workload: Any  # a WorkloadConfig (or a test stand-in with the same fields used here)
    launch: str = "graph"  # "graph" (CUDA graph replay) | "eager" (ops launched from Python each step)
    thread_pct: int | None = None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of its process (mps mode)
    seed: int = 0
    in_flight: int = 3
    may_fault: bool = False  # prepare the fault-injection kernel before the window (it must not compile mid-window)
    env: dict = field(default_factory=dict, compare=False)  # extra environment of its process


class Lane(Protocol):
    """A kernel stream a client can step. Tokens are whatever ``fence`` returns (CUDA events, for real lanes)."""

    def prepare(self) -> None: ...  # capture / warm up; after this a step costs only its launch
    def launch(self) -> None: ...  # enqueue one step, without waiting for it
    def fence(self) -> Any: ...  # a token for "everything launched so far on this lane"
    def done(self, token: Any) -> bool: ...  # non-blocking; raises the lane's error if it has one
    def wait(self, token: Any) -> None: ...  # block until done
    def synchronize(self) -> None: ...
    def inject_fault(self) -> None: ...  # make this lane's process fault (an illegal memory access)
    def describe(self) -> dict: ...  # tokens_per_step, bytes/flops, layers, backends, kernel info, device


LaneFactory = Callable[[LaneSpec], Lane]


def resolve_factory(factory: LaneFactory | str) -> LaneFactory:
    """A factory given as "module:function" is imported here, in the client: the driver never imports the
    CUDA lanes (nor torch.cuda code), and the name pickles where a local function would not."""
    if callable(factory):
        return factory
    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def run_window(lanes: list[Lane], deadline: float, in_flight: int,
               fault: tuple[int, float] | None = None) -> dict:
    """Step every lane until ``deadline`` (time.monotonic()); returns per-lane step counts and times.

    ``fault=(i, at)`` makes lane ``i`` inject a fault once the clock passes ``at``.
    """
    t_start = time.monotonic()
    single = len(lanes) == 1
    queues: list[deque] = [deque() for _ in lanes]
    steps = [0] * len(lanes)
    fault_lane, fault_at = fault if fault is not None else (-1, float("inf"))
    injected = False
    now = t_start
    while now < deadline:
        for j, lane in enumerate(lanes):
            queue = queues[j]
            if len(queue) >= in_flight:
                if single:
                    lane.wait(queue.popleft())
                elif lane.done(queue[0]):  # several lanes: poll, so a slow lane never stalls the others
                    queue.popleft()
                else:
                    continue
            lane.launch()
            queue.append(lane.fence())
            steps[j] += 1
        now = time.monotonic()
        if not injected and now >= fault_at:
            lanes[fault_lane].inject_fault()
            injected = True
    # Each lane finishes when its last step completes (steps complete in order on a lane).
    finish: list[float | None] = [None] * len(lanes)
    while any(f is None for f in finish):
        for j, lane in enumerate(lanes):
            if finish[j] is not None:
                continue
            last = queues[j][-1] if queues[j] else None
            if last is None or single:
                if last is not None:
                    lane.wait(last)
                finish[j] = time.monotonic()
            elif lane.done(last):
                finish[j] = time.monotonic()
    for lane in lanes:
        lane.synchronize()  # surfaces an error of a lane whose last token raced it
    return {"t_start": t_start, "lanes": [{"steps": s, "t_finish": f} for s, f in zip(steps, finish, strict=True)],
            "fault_injected": injected}


def _apply_env(env: dict) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def client_main(conn: Connection, specs: list[LaneSpec], factory: LaneFactory | str) -> None:
    """Entry point of a spawned client process.

    Messages to the driver: ("ready", info) | ("result", window) | ("error", {"stage", "message"}).
    From the driver: ("build", None), once, first | ("window", {"lanes", "deadline", "fault"}) | ("stop", None).
    """
    # The driver owns shutdown: Ctrl-C in the terminal reaches the whole process group, and a client that
    # died of it would look like a failed measurement.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for spec in specs:  # before any CUDA call: MPS reads its environment when the context is created
        _apply_env(spec.env)
    try:
        build = resolve_factory(factory)  # the imports run in parallel with the other clients'
        if not _wait_for_build(conn):
            return
        started = time.monotonic()
        lanes = [build(spec) for spec in specs]
        for lane in lanes:
            lane.prepare()
        info = {"pid": os.getpid(), "built": [started, time.monotonic()],  # system-wide monotonic clock
                "lanes": [lane.describe() for lane in lanes]}
    except BaseException as exc:
        _send(conn, ("error", {"stage": "start-up", "message": one_line(exc), "trace": traceback.format_exc()}))
        return
    _send(conn, ("ready", info))
    in_flight = max(spec.in_flight for spec in specs)
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if kind == "stop":
            return
        try:
            ids, fault = payload["lanes"], payload.get("fault")  # lane numbers within this process
            result = run_window([lanes[i] for i in ids], payload["deadline"], in_flight,
                                (ids.index(fault["lane"]), fault["at"]) if fault else None)
        except BaseException as exc:
            # A CUDA error is sticky: this process cannot run another step, so report and leave.
            _send(conn, ("error", {"stage": "window", "message": one_line(exc), "trace": traceback.format_exc()}))
            return
        result["pid"] = os.getpid()
        _send(conn, ("result", result))


def _wait_for_build(conn: Connection) -> bool:
    """Block until the driver says it is this client's turn to allocate and capture (False: it is gone)."""
    try:
        kind, _ = conn.recv()
    except (EOFError, OSError):
        return False
    return kind == "build"


def _send(conn: Connection, message: tuple) -> None:
    with contextlib.suppress(OSError):  # the driver is gone (broken pipe): nothing left to tell
        conn.send(message)
