"""Device-side timing and the measured ceiling (copy bandwidth) every number is reported against."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def time_per_call_ms(fn: Callable[[], object], *, calls: int = 20, rounds: int = 15, warmup: int = 3,
                     graph: bool = True) -> list[float]:
    """Per-call device time (ms) of ``fn`` in each round: CUDA events around ``calls`` back-to-back calls.

    With ``graph`` (default) the calls are captured once in a CUDA graph and each round replays it, so the
    host's per-call cost (Python, validation, Triton's launcher) never starves the GPU, as in an engine
    that replays its decode step; the time is the kernels' own. Without it, calls are launched eagerly."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run: Callable[[], object]
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(calls):
                fn()
    run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return times


def rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``calls`` in turn, so back-to-back timed calls walk through several buffer sets
    and none of them is served from L2."""
    state = {"i": 0}

    def run() -> object:
        result = calls[state["i"] % len(calls)]()
        state["i"] += 1
        return result

    return run


def median_ms(fn: Callable[[], object], **kw) -> float:
    return statistics.median(time_per_call_ms(fn, **kw))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (the ANCHORS.md ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    # eager: a captured memcpy node runs slower than the copy itself; 2 GB calls make launch cost moot
    ms = median_ms(lambda: dst.copy_(src), calls=5, rounds=10, graph=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9
