"""Device-side timing, and the measured ceilings every number is reported against: a device-to-device copy
(the bars of the issues) and a streaming read (the roofline of a kernel that only reads)."""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch


def graphed(fn: Callable[[], object], *, calls: int = 20, warmup: int = 3) -> Callable[[], None]:
    """``calls`` back-to-back calls of ``fn`` captured once in a CUDA graph (after ``warmup`` eager calls);
    returns the graph's replay. The host's per-call cost (Python, validation, Triton's launcher) then never
    starves the GPU, as in an engine that replays its decode step: the time is the kernels' own."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()

    def replay(_fn: Callable[[], object] = fn) -> None:  # holds fn: the tensors the graph reads and writes
        g.replay()

    return replay


def timed_ms(run: Callable[[], object], calls: int) -> float:
    """Device time per call (ms) of one ``run()`` that makes ``calls`` calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def time_per_call_ms(fn: Callable[[], object], *, calls: int = 20, rounds: int = 15, warmup: int = 3,
                     graph: bool = True) -> list[float]:
    """Per-call device time (ms) of ``fn`` in each round: CUDA events around ``calls`` back-to-back calls,
    captured in a CUDA graph (``graph``, the default; see :func:`graphed`) or launched eagerly."""
    if graph:
        run = graphed(fn, calls=calls, warmup=warmup)
    else:
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(calls):
                fn()
    run()
    return [timed_ms(run, calls) for _ in range(rounds)]


def interleaved_ms(runs: Sequence[Callable[[], object]], *, calls: int, rounds: int) -> list[list[float]]:
    """Per-call ms of each of ``runs`` (e.g. :func:`graphed` replays of ``calls`` calls) in each round. Every
    round times each run once, and the order rotates from round to round, so drift of the card during the
    measurement (clocks, HBM temperature, a neighbour's load) reaches every run alike: ratios taken round by
    round are tighter than ratios of separately measured medians (2% apart between runs of the same code on
    H200, 0.5% round by round)."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        for j in range(len(runs)):
            i = (r + j) % len(runs)
            times[i].append(timed_ms(runs[i], calls))
    return times


def round_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """num[i] / den[i] for each round of two :func:`interleaved_ms` series (e.g. SDPA's time over the kernel's:
    its speed-up in each round); their median is the ratio the benchmarks report."""
    if len(num) != len(den):
        raise ValueError(f"series of {len(num)} and {len(den)} rounds")
    return [n / d for n, d in zip(num, den)]


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


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Streaming-read bandwidth: a Triton kernel that reads two alternating ``nbytes`` buffers once each and
    writes one float per program, so nearly every byte moved is a read. On H200 it reads 6 to 9% above the copy
    ceiling, and SDPA's decode kernel over contiguous KV reaches 89 to 97% of it (BENCHMARKS.md)."""
    from .triton.stream_read import stream_read, stream_read_programs

    xs = [torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    out = torch.empty(stream_read_programs(xs[0].numel()), device="cuda")
    ms = median_ms(rotating([lambda x=x: stream_read(x, out) for x in xs]), calls=10, rounds=10)
    return nbytes / (ms * 1e-3) / 1e9
