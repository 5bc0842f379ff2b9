"""``mpskern overlap`` / ``python -m mpskern.overlap``: how much more work N processes get done on one GPU
than one process, for one kernel stream, under MPS, time-slicing or N streams in one process.

Prints a compact table and, with ``--json PATH``, writes the full versioned record (results.py).
Exit codes: 0 measured (or fault experiment done), 1 a configuration failed (the record says how),
2 bad input or environment (one line on stderr, nothing started or left behind), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import device_info, driver, mps, results
from .metrics import GpmSampler
from .models import ModelShape, custom_model

GIB = 2**30
DEFAULT_BUDGET_GIB = 20.0  # per stream, when the GPU has room for it
CONTEXT_OVERHEAD_GIB = 1.0  # per client process: CUDA context, cuBLAS workspace, allocator slack
FREE_MEMORY_USE = 0.9  # leave the rest of the free memory for fragmentation and the MPS server


class UsageError(Exception):
    """Bad input or environment: reported as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text does not already explain it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas; got {text!r}") from None


def _model_shape(text: str) -> ModelShape:
    """--shape hidden,intermediate,heads,kv_heads,head_dim,layers[,act]: a custom model shape."""
    parts = [x.strip() for x in text.split(",")]
    if len(parts) not in (6, 7):
        raise argparse.ArgumentTypeError(
            f"expected hidden,intermediate,heads,kv_heads,head_dim,layers[,act]; got {text!r}")
    try:
        hidden, inter, heads, kv_heads, head_dim, layers = (int(x) for x in parts[:6])
    except ValueError:
        raise argparse.ArgumentTypeError(f"the six sizes must be integers; got {text!r}") from None
    try:
        return custom_model(hidden=hidden, intermediate=inter, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            layers=layers, act=parts[6] if len(parts) == 7 else "silu")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser(prog: str = "mpskern overlap") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, formatter_class=_HelpFormatter,
                description="Measure how much more work N processes get done on one GPU than one process, for one "
                            "kernel stream: under MPS, time-slicing, or as N streams of one process.")
    w = p.add_argument_group("workload (one client's stream)")
    w.add_argument("--model", default="Qwen2.5-0.5B", help="model preset (mpskern.models.PRESETS)")
    w.add_argument("--shape", type=_model_shape, default=None, metavar="H,I,NH,KVH,D,L[,ACT]",
                   help="custom model shape instead of --model: hidden, intermediate, heads, kv heads, head_dim, "
                        "layers, and optionally the activation (silu | gelu_tanh)")
    w.add_argument("--phase", default="decode", help="decode | prefill")
    w.add_argument("--kernel", default="attn", help="attn | mlp | layer")
    w.add_argument("--pair", type=_name_list, default=None, metavar="K1,K2",
                   help="different streams per client: client i runs K[i mod len] (e.g. attn,mlp); "
                        "default: every client runs --kernel")
    w.add_argument("--batch", type=int, default=64, help="sequences per step (per client unless --split)")
    w.add_argument("--ctx", "--context", dest="context", type=int, default=512,
                   help="decode: KV length per sequence; prefill: prompt length")
    w.add_argument("--backend", default="torch", help="cuda | triton | torch")
    w.add_argument("--fusion", default="fused", help="fused | unfused small ops (layer streams)")
    w.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16")
    w.add_argument("--page-size", type=int, default=16, help="KV-cache page size")
    w.add_argument("--layers", type=int, default=None,
                   help="layers per step (default: the model's, adjusted so the working set is >= 4x L2 "
                        "and fits the memory budget)")
    w.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help=f"GiB one stream may allocate (default: {DEFAULT_BUDGET_GIB:g}, less when the free GPU "
                        "memory shared by all streams is smaller)")
    s = p.add_argument_group("sharing")
    s.add_argument("-n", "--clients", type=int, default=2, help=f"N, clients sharing the GPU (1..{driver.MAX_CLIENTS})")
    s.add_argument("--mode", type=_name_list, default="mps", metavar="MODE[,MODE]",
                   help="mps (private MPS daemon) | timeslice (no MPS) | streams (one process, N CUDA streams); "
                        "a list runs each in turn")
    s.add_argument("--mps", dest="mps_policy", default="private", choices=("private", "external"),
                   help="private: start and stop our own daemon; external: use the one already running")
    s.add_argument("--split", action="store_true",
                   help="fixed load: divide --batch among the N clients (default: each client runs the full batch)")
    s.add_argument("--thread-pct", type=_int_list, default=None, metavar="P[,P...]",
                   help="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per client (one value for all, or one per client); "
                        "mps mode only; the 1-client reference always runs unrestricted")
    t = p.add_argument_group("launch and timing")
    t.add_argument("--launch", default="graph", choices=driver.LAUNCHES, help="CUDA-graph replay or eager launch")
    t.add_argument("--trials", type=int, default=3, help="trials, each: every client alone, then all together")
    t.add_argument("--duration", type=float, default=2.0, help="seconds per measurement window")
    t.add_argument("--warmup", type=float, default=0.5, help="seconds of one unrecorded window of each kind")
    t.add_argument("--in-flight", type=int, default=3, help="steps a client keeps queued on the GPU")
    t.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for clients to build and capture")
    t.add_argument("--window-timeout", type=float, default=30.0,
                   help="seconds past a window's end before a silent client counts as hung")
    e = p.add_argument_group("experiments and output")
    e.add_argument("--inject-fault", type=int, default=None, metavar="CLIENT",
                   help="client CLIENT performs an illegal memory access mid-window; reports what happened to "
                        "the others in each mode (no throughput numbers)")
    e.add_argument("--json", default=None, metavar="PATH", help="write the full record here (atomically)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


# --- turning arguments into a checked plan -------------------------------------------------------------------

def base_workload(args: argparse.Namespace, budget_gib: float):
    from .workloads import WorkloadConfig

    return WorkloadConfig(model=args.shape.name if args.shape else args.model, shape=args.shape, phase=args.phase, kernel=args.kernel, batch=args.batch,
                          context=args.context, backend=args.backend, fusion=args.fusion, dtype=args.dtype,
                          page_size=args.page_size, layers=args.layers, memory_budget_gb=budget_gib)


def make_layout(args: argparse.Namespace, budget_gib: float) -> driver.Layout:
    pct = args.thread_pct
    if pct is not None and len(pct) == 1:
        pct = pct[0]
    return driver.layout_lanes(base_workload(args, budget_gib), args.clients, kernels=args.pair, split=args.split,
                               thread_pct=pct, launch=args.launch, in_flight=args.in_flight,
                               fault_client=args.inject_fault)


def check_layout(layout: driver.Layout) -> list:
    """Validate every lane's workload (unknown model, bad sizes, over the memory budget); returns the plans."""
    from .workloads import plan

    plans = []
    for lane in layout.lanes:
        try:
            plans.append(plan(lane.workload))
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
    return plans


def processes(layout: driver.Layout, modes: Sequence[str]) -> int:
    return max(1 if mode == "streams" else len(layout.lanes) for mode in modes)


def fit_to_memory(args: argparse.Namespace, layout: driver.Layout, modes: Sequence[str], free_bytes: int
                  ) -> driver.Layout:
    """Size the streams for the GPU's free memory; UsageError if the configuration cannot fit."""
    n_proc, n_streams = processes(layout, modes), len(layout.lanes)
    free_gib = free_bytes / GIB
    too_large = (f"context {args.context} x batch {args.batch} too large for GPU memory: {n_streams} streams in "
                 f"{n_proc} processes")
    hint = "lower --ctx, --batch or --clients"
    if args.memory_budget is None:
        budget = int(100 * (FREE_MEMORY_USE * free_gib - CONTEXT_OVERHEAD_GIB * n_proc) / n_streams) / 100
        budget = min(DEFAULT_BUDGET_GIB, budget)
        if budget <= 0:
            raise UsageError(f"{too_large} leave no memory of the {free_gib:.1f} GiB free; {hint}")
        layout = make_layout(args, budget)
        try:
            plans = check_layout(layout)
        except UsageError as exc:
            raise UsageError(f"{too_large} get {budget:.2f} GiB each of the {free_gib:.1f} GiB free, and {exc}"
                             ) from None
    else:
        plans = check_layout(layout)
    need = sum(p.memory_bytes for p in plans) / GIB + CONTEXT_OVERHEAD_GIB * n_proc
    if need > FREE_MEMORY_USE * free_gib:
        raise UsageError(f"{too_large} need {need:.1f} GiB, {free_gib:.1f} GiB is free; {hint}")
    return layout


def check_modes(args: argparse.Namespace) -> list[str]:
    modes = list(dict.fromkeys(args.mode))
    for mode in modes:
        if mode not in driver.MODES:
            raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(driver.MODES)}")
    if args.thread_pct is not None and modes != ["mps"]:
        raise UsageError("--thread-pct applies only to --mode mps")
    if args.mps_policy == "external" and "mps" not in modes:
        raise UsageError("--mps external needs --mode mps")
    try:
        driver.RunOptions(trials=args.trials, duration_s=args.duration, warmup_s=args.warmup).check()
    except driver.ConfigError as exc:
        raise UsageError(str(exc)) from None
    return modes


def run_options(args: argparse.Namespace, mode: str) -> driver.RunOptions:
    return driver.RunOptions(mode=mode, duration_s=args.duration, warmup_s=args.warmup, trials=args.trials,
                             startup_timeout_s=args.startup_timeout, window_timeout_s=args.window_timeout)


def config_record(args: argparse.Namespace, layout: driver.Layout, modes: list[str]) -> dict:
    return {
        "workload": layout.lanes[layout.reference_of[0]].workload.as_dict(),  # client 0's stream, full batch
        "kernels": args.pair or [args.kernel],
        "clients": args.clients,
        "modes": modes,
        "mps": args.mps_policy,
        "load": "split" if args.split else "replicated",
        "launch": args.launch,
        "thread_pct": args.thread_pct,
        "trials": args.trials,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "in_flight": args.in_flight,
        "startup_timeout_s": args.startup_timeout,
        "window_timeout_s": args.window_timeout,
        "inject_fault": args.inject_fault,
        "reference_of": {str(k): v for k, v in layout.reference_of.items()},
    }


# --- the human table -----------------------------------------------------------------------------------------

def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _med(s: dict | None) -> float | None:
    return s["median"] if s else None


def _pct_pair(alone: dict, shared: dict, key: str) -> str:
    values = [_med(g.get(key)) if g.get("supported") else None for g in (alone, shared)]
    if values == [None, None]:
        return "n/a"
    return "/".join("-" if v is None else f"{v:.0f}" for v in values)


_GPM_COLUMNS = (("sm_util_pct", 9), ("sm_occupancy_pct", 9), ("dram_bw_util_pct", 9), ("tensor_util_pct", 11))


def format_table(record: dict) -> str:
    cfg, dev = record["config"], record["device"]
    w = {k: cfg["workload"].get(k, "?") for k in ("model", "phase", "batch", "context", "backend", "fusion")}
    kernels = ",".join(cfg["kernels"])
    lines = [
        f"mpskern overlap: {w['model']} {w['phase']} {kernels}, batch {w['batch']}, ctx {w['context']}, "
        f"{w['backend']}/{w['fusion']}, {cfg['launch']}; {cfg['clients']} clients, {cfg['load']} load; "
        f"{cfg['trials']} trials x {cfg['duration_s']:g} s",
        f"device: {dev.get('name', '?')}, {dev.get('sms', '?')} SMs, driver {dev.get('driver_version', '?')}, "
        f"CUDA {dev.get('cuda_driver_version', '?')}",
        "",
        f"{'mode':<10} {'thr 1':>8} {'thr N':>8}  {'gain (min..max)':<26} {'lat x':>6} {'skew ms':>7}  "
        f"{'SM% 1/N':>9} {'occ% 1/N':>9} {'DRAM% 1/N':>9} {'tensor% 1/N':>11}",
    ]
    notes: list[str] = []
    for run in record["runs"]:
        mode = run["mode"]
        if run["status"] == "failed":
            lines.append(f"{mode:<10} FAILED: {run['error']}")
            continue
        if run["status"] == "fault":
            fates = ", ".join(f"client {c['lane']}{' (faulting)' if c['injected'] else ''} {c['status']}"
                              + (f" [{c['detail']}]" if c["detail"] else "") for c in run["fault"]["clients"])
            restarted = (run.get("recovery") or {}).get("daemon_restarted")
            lines.append(f"{mode:<10} fault: {fates}" + ("; daemon restarted" if restarted else ""))
            continue
        s = run["summary"]
        g = s["gain"]
        alone = s["alone_tokens_per_s"]
        first_ref = next(iter(alone))
        gpm_alone, gpm_shared = s["gpm_alone"][first_ref], s["gpm_shared"]
        spread = f"{g['median']:+.1%} ({g['min']:+.1%}..{g['max']:+.1%})"
        inflation, skew = _med(s["latency_inflation_mean"]) or 0.0, _med(s["finish_skew_ms"]) or 0.0
        cells = [f"{mode:<10}", f"{_rate(_med(alone[first_ref])):>8}",
                 f"{_rate(_med(s['aggregate_tokens_per_s'])):>8} ", f"{spread:<26}", f"{inflation:>6.2f}",
                 f"{skew:>7.2f} ", *(f"{_pct_pair(gpm_alone, gpm_shared, k):>{width}}" for k, width in _GPM_COLUMNS)]
        lines.append(" ".join(cells))
        if len(alone) > 1:
            kinds = {str(lane["index"]): lane["workload"]["kernel"] for lane in run["lanes"]}
            notes.append(f"{mode}: thr 1 of each reference: "
                         + ", ".join(f"lane {ref} {kinds.get(ref, '?')} {_rate(_med(v))}" for ref, v in alone.items()))
        if not gpm_shared.get("supported"):
            notes.append(f"{mode}: GPM n/a: {gpm_shared.get('reason')}")
        notes.extend(f"{mode}: {line}" for line in _kernel_lines(run))
    lines.append("")
    lines.append("thr: tokens/s (thr 1: client 0 alone; thr N: all clients); gain = STP - 1 (each client over its own "
                 "alone run), median (range) over trials; "
                 "lat x: time per step shared / alone;")
    lines.append("SM, occupancy, DRAM and tensor %: GPM averages over the 1-client / N-client windows")
    return "\n".join(lines + notes)


def _kernel_lines(run: dict) -> list[str]:
    seen, out = set(), []
    for lane in run["lanes"]:
        kernels = lane["info"].get("kernels") or {}
        for op, info in (kernels.get("ops") or {}).items():
            for name, k in info.items():
                if isinstance(k, dict) and "theoretical_occupancy" in k and (op, name) not in seen:
                    seen.add((op, name))
                    out.append(f"{name}: theoretical occupancy {k['theoretical_occupancy']:.0%} "
                               f"({k.get('block_size')} threads/block, {k.get('registers')} regs, "
                               f"{(k.get('static_smem', 0) + k.get('dynamic_smem', 0)) / 1024:.0f} KiB smem, "
                               f"grid {k.get('grid_size')})")
    return out


# --- main ----------------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace) -> tuple[list[str], driver.Layout, dict]:
    """Every check that needs no client: input, then MPS binary, GPU and memory. Raises UsageError & co."""
    modes = check_modes(args)
    layout = make_layout(args, args.memory_budget or DEFAULT_BUDGET_GIB)
    check_layout(layout)
    if "mps" in modes:
        mps.control_binary()
    nvml_device = device_info.describe_device()
    layout = fit_to_memory(args, layout, modes, device_info.free_memory_bytes())
    return modes, layout, nvml_device


def measure(args: argparse.Namespace, layout: driver.Layout, modes: list[str], nvml_device: dict, *,
            factory: driver.LaneFactory | str = driver.DEFAULT_FACTORY, sampler: GpmSampler | None = None,
            log: Callable[[str], None] = lambda msg: None, argv: Sequence[str] = ()) -> dict:
    """Run every mode and return the record. The daemon (if any) is stopped however this exits."""
    with mps.terminate_on_signals(), driver.Sharing(args.mps_policy) as sharing:
        sharing.prepare(modes)
        sampler = sampler or GpmSampler()
        runs = [driver.run(layout, run_options(args, mode), sharing, factory=factory, sampler=sampler, log=log)
                for mode in modes]
    client_device = next((r["device"] for r in runs if r.get("device")), None)
    return results.build_record(config=config_record(args, layout, modes), runs=runs,
                                device=results.device_record(nvml_device, client_device), argv=list(argv))


def main(argv: Sequence[str] | None = None, prog: str = "mpskern overlap") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
        log = (lambda msg: None) if args.quiet else (lambda msg: print(f"mpskern: {msg}", file=sys.stderr, flush=True))
        modes, layout, nvml_device = prepare(args)
        record = measure(args, layout, modes, nvml_device, log=log, argv=[prog, *argv])
    except (UsageError, driver.ConfigError, mps.MpsError, device_info.NoGpuError) as exc:
        print(f"mpskern: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpskern: interrupted (clients stopped, MPS daemon quit)", file=sys.stderr)
        return 130
    print(format_table(record))
    if args.json:
        log(f"wrote {results.write_json_atomic(args.json, record)}")
    return 0 if all(r["status"] in ("ok", "fault") for r in record["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main(prog="python -m mpskern.overlap"))
