"""The versioned result record of an overlap run: schema, environment capture, validation, atomic writes.

One record per run: ``schema``, when and how it ran (``created``, ``argv``), the ``git`` commit, ``software``
versions, the ``device``, the full ``config``, and one entry per configuration (mode) in ``runs`` with its
lanes, every trial (windows with per-client numbers and GPM metrics) and the summary. Readers check
``schema``: the name says what the record is, the number changes when a field changes meaning.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_NAME = "mpskern.overlap"
SCHEMA_VERSION = 1
SCHEMA = f"{SCHEMA_NAME}/{SCHEMA_VERSION}"

_RECORD_KEYS = ("schema", "created", "argv", "git", "software", "device", "config", "runs")
_RUN_KEYS = ("mode", "status", "error", "failures", "lanes", "attach", "trials", "summary", "fault", "recovery")
_RUN_STATUSES = ("ok", "failed", "fault")
_TRIAL_KEYS = ("trial", "windows", "stp", "gain", "aggregate_tokens_per_s", "alone_tokens_per_s", "clients")
_WINDOW_KEYS = ("kind", "lanes", "duration_s", "gpm", "clients", "start_skew_ms", "finish_skew_ms")
_CLIENT_KEYS = ("lane", "pid", "steps", "elapsed_s", "steps_per_s", "tokens_per_s", "step_ms")


def git_info(path: str | os.PathLike | None = None) -> dict:
    """Commit of the checkout this package runs from (None outside a git checkout)."""
    where = Path(path) if path else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict:
    """Versions of what shapes the numbers. torch is read without touching CUDA (the driver has no context)."""
    from . import __version__

    out: dict[str, Any] = {
        "mpskern": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "nvidia-ml-py": _version("nvidia-ml-py"),
        "numpy": _version("numpy"),
    }
    if "torch" in sys.modules:
        out["torch_cuda"] = sys.modules["torch"].version.cuda
    return out


def device_record(nvml_device: dict | None, client_device: dict | None) -> dict:
    """The device as NVML (driver, CUDA driver, memory, UUID) and a client's CUDA runtime (SMs, L2) saw it."""
    out: dict[str, Any] = {}
    out.update(nvml_device or {})
    for key, value in (client_device or {}).items():
        out.setdefault(key, value)
    return out


def build_record(*, config: dict, runs: list[dict], device: dict, argv: list[str] | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv if argv is not None else sys.argv),
        "git": git_info(),
        "software": software_versions(),
        "device": device,
        "config": config,
        "runs": runs,
    }


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object; got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")


def validate_record(record: dict) -> None:
    """Raise ValueError (naming the place) if ``record`` is not a well-formed record of this schema."""
    _require(record, _RECORD_KEYS, "record")
    if record["schema"] != SCHEMA:
        raise ValueError(f"record schema is {record['schema']!r}; this version reads {SCHEMA!r}")
    if not isinstance(record["runs"], list):
        raise ValueError("record.runs must be a list")
    for i, run in enumerate(record["runs"]):
        where = f"runs[{i}]"
        _require(run, _RUN_KEYS, where)
        if run["status"] not in _RUN_STATUSES:
            raise ValueError(f"{where}.status must be one of {_RUN_STATUSES}; got {run['status']!r}")
        if run["status"] == "failed" and not run["error"]:
            raise ValueError(f"{where} failed without an error message")
        if run["status"] == "fault":
            _require(run["fault"], ("client", "window", "clients"), f"{where}.fault")
        for j, trial in enumerate(run["trials"]):
            _require(trial, _TRIAL_KEYS, f"{where}.trials[{j}]")
            for k, window in enumerate(trial["windows"]):
                _require(window, _WINDOW_KEYS, f"{where}.trials[{j}].windows[{k}]")
                _require(window["gpm"], ("supported",), f"{where}.trials[{j}].windows[{k}].gpm")
                for m, client in enumerate(window["clients"]):
                    _require(client, _CLIENT_KEYS, f"{where}.trials[{j}].windows[{k}].clients[{m}]")
        if run["status"] == "ok" and run["trials"]:
            _require(run["summary"], ("gain", "stp", "aggregate_tokens_per_s", "gpm_alone", "gpm_shared"),
                     f"{where}.summary")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON so that ``path`` holds either the old file or the complete new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_record(path: str | os.PathLike) -> dict:
    record = json.loads(Path(path).read_text())
    validate_record(record)
    return record
