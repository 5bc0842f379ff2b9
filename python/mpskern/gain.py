"""From step counts to the numbers a run reports: throughput, system throughput and gain, latency inflation,
skew, and their spread over trials.

Definitions (DESIGN.md, "The overlap measurement"):
- STP = sum over the N shared clients of thr_i(shared) / thr_ref(i)(alone), where ref(i) is the stream
  measured alone as client i's reference: the same stream for replicated load, the full-batch stream for
  ``--split``. Gain = STP - 1; for identical streams it is aggregate(N) / thr(1) - 1.
- Latency inflation of a client = its time per step shared / its reference's time per step alone.
Throughput is in tokens per second (decode: sequences x steps; prefill: prompt tokens x steps), so split
clients with smaller batches compare correctly with their full-batch reference.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence

from .metrics import GPM_METRICS


def lane_rates(steps: int, elapsed_s: float, tokens_per_step: int) -> dict:
    steps_per_s = steps / elapsed_s if elapsed_s > 0 else 0.0
    return {
        "steps": steps,
        "elapsed_s": elapsed_s,
        "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * tokens_per_step,
        "step_ms": 1e3 * elapsed_s / steps if steps else None,
    }


def skew_ms(times: Iterable[float]) -> float:
    times = list(times)
    return 1e3 * (max(times) - min(times)) if times else 0.0


def trial(alone: Mapping[int, Mapping], shared: Mapping[int, Mapping], reference_of: Mapping[int, int]) -> dict:
    """One trial's numbers. ``alone[ref]`` and ``shared[lane]`` are the per-lane rates of the windows."""
    clients = []
    for lane, rates in sorted(shared.items()):
        ref = alone[reference_of[lane]]
        clients.append({
            "lane": lane,
            "reference": reference_of[lane],
            "tokens_per_s": rates["tokens_per_s"],
            "alone_tokens_per_s": ref["tokens_per_s"],
            "relative_throughput": rates["tokens_per_s"] / ref["tokens_per_s"],
            "step_ms": rates["step_ms"],
            "alone_step_ms": ref["step_ms"],
            "latency_inflation": (rates["step_ms"] / ref["step_ms"]) if rates["step_ms"] and ref["step_ms"] else None,
        })
    stp = sum(c["relative_throughput"] for c in clients)
    inflation = [c["latency_inflation"] for c in clients if c["latency_inflation"] is not None]
    return {
        "stp": stp,
        "gain": stp - 1.0,
        "aggregate_tokens_per_s": sum(c["tokens_per_s"] for c in clients),
        "alone_tokens_per_s": {str(ref): alone[ref]["tokens_per_s"] for ref in sorted(set(reference_of.values()))},
        "latency_inflation_mean": statistics.fmean(inflation) if inflation else None,
        "latency_inflation_max": max(inflation) if inflation else None,
        "clients": clients,
    }


def spread(values: Iterable[float | None]) -> dict | None:
    """Median and range over trials (None entries, e.g. an unsupported metric, are skipped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def gpm_spread(windows: Sequence[Mapping]) -> dict:
    """Per-metric spread of the windows' GPM readings, or the reason they have none."""
    supported = [w["gpm"] for w in windows if w.get("gpm", {}).get("supported")]
    if not supported:
        reasons = {w.get("gpm", {}).get("reason") for w in windows} - {None}
        return {"supported": False, "reason": "; ".join(sorted(reasons)) or "no windows"}
    return {"supported": True, **{name: spread(g.get(name) for g in supported) for name in GPM_METRICS}}


def summarize(trials: Sequence[Mapping]) -> dict:
    """Median and spread over trials of everything the human table shows."""
    if not trials:
        return {}
    refs = list(trials[0]["alone_tokens_per_s"])
    lanes = [c["lane"] for c in trials[0]["clients"]]
    alone_windows = [w for t in trials for w in t["windows"] if w["kind"] == "alone"]
    shared_windows = [w for t in trials for w in t["windows"] if w["kind"] == "shared"]
    return {
        "gain": spread(t["gain"] for t in trials),
        "stp": spread(t["stp"] for t in trials),
        "aggregate_tokens_per_s": spread(t["aggregate_tokens_per_s"] for t in trials),
        "alone_tokens_per_s": {ref: spread(t["alone_tokens_per_s"][ref] for t in trials) for ref in refs},
        "client_tokens_per_s": {str(lane): spread(c["tokens_per_s"] for t in trials for c in t["clients"]
                                                  if c["lane"] == lane) for lane in lanes},
        "latency_inflation_mean": spread(t["latency_inflation_mean"] for t in trials),
        "latency_inflation_max": spread(t["latency_inflation_max"] for t in trials),
        "finish_skew_ms": spread(w["finish_skew_ms"] for w in shared_windows),
        "gpm_alone": {ref: gpm_spread([w for w in alone_windows if w["lanes"] == [int(ref)]]) for ref in refs},
        "gpm_shared": gpm_spread(shared_windows),
    }
