"""`dtype: auto` and `bf16: auto`: bfloat16 where the device computes it natively, float32 elsewhere.

A CPU without bf16 matrix units emulates bfloat16, many times slower than float32; with AMX or AVX512-BF16,
bf16 is the faster of the two (docs/BENCHMARKS.md has both measured). So ``auto`` decides per device:

- CUDA: bfloat16 when ``torch.cuda.is_bf16_supported()``, else float32;
- CPU: bfloat16 when its flags (``/proc/cpuinfo``) list ``amx_bf16`` or ``avx512_bf16``, else float32. Where the
  flags cannot be read (macOS, Windows) a 256 x 256 matmul is timed once in each dtype and the answer cached in
  ``<cache_dir>/precision.json`` (bf16 when it is at least 0.8 x float32's speed).

``LENVM_RL_PRECISION=float32`` (or ``bfloat16``) overrides the choice, e.g. to time a run in float32 on a CPU that
would pick bf16. The choice is printed once per process and device; stages record the resolved values (the
rollout and evaluate manifests' ``dtype``, the run record's ``bf16``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lenvm_rl.errors import ConfigError

PRECISION_ENV = "LENVM_RL_PRECISION"
PRECISIONS = ("float32", "bfloat16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX512-BF16, Arm BF16


def cache_dir() -> Path:
    """Where the project caches what it computes once per machine (converted embedded models, ``precision.json``)."""
    return Path(os.environ.get("LENVM_RL_CACHE", Path.home() / ".cache" / "lenvm_rl"))


@dataclass(frozen=True)
class Precision:
    """The dtype ``auto`` resolves to on ``device`` ("cpu" or "cuda"), and why."""

    dtype: str
    device: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"


def cpu_flags() -> set[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo`` (Linux), or None where they cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.split(":", 1)[0].strip() in ("flags", "Features"):
            return set(line.split(":", 1)[1].split())
    return None


def timed_bf16_speedup(size: int = 256, seconds: float = 0.2) -> float:
    """bf16 matmul throughput over float32's on this CPU (> 1: bf16 is faster), from ``size`` x ``size`` matmuls."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            calls += 1
        rates[dtype] = calls / (time.perf_counter() - start)
    return rates[torch.bfloat16] / rates[torch.float32]


def cpu_precision(flags: set[str] | None) -> tuple[str, str]:
    """(dtype, reason) on this CPU from its ``flags``; without flags from a timed matmul, cached on disk."""
    if flags is not None:
        native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
        if native:
            return "bfloat16", f"the CPU has {' and '.join(native)}"
        return "float32", "the CPU has no amx_bf16 / avx512_bf16: bf16 would be emulated"
    cache = cache_dir() / "precision.json"
    try:
        speedup = json.loads(cache.read_text())["bf16_speedup"]
    except (OSError, ValueError, KeyError):
        speedup = timed_bf16_speedup()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"bf16_speedup": speedup}))
    dtype = "bfloat16" if speedup >= 0.8 else "float32"
    return dtype, f"CPU flags unreadable; a timed bf16 matmul ran at {speedup:.2f}x float32 ({cache})"


@functools.cache
def auto_precision(device: str) -> Precision:
    """What ``auto`` means on ``device`` ("cpu" or "cuda"); decided, and printed, once per process."""
    forced = os.environ.get(PRECISION_ENV)
    if forced:
        if forced not in PRECISIONS:
            raise ConfigError(f"{PRECISION_ENV}: {forced!r} is not a precision; use one of {', '.join(PRECISIONS)}")
        choice = Precision(forced, device, f"forced by {PRECISION_ENV}")
    elif device == "cuda":
        supported = torch.cuda.is_bf16_supported()
        choice = Precision(
            "bfloat16" if supported else "float32",
            device,
            "the GPU supports bf16" if supported else "the GPU has no bf16",
        )
    else:
        dtype, reason = cpu_precision(cpu_flags())
        choice = Precision(dtype, device, reason)
    print(
        f"lenvm-rl precision: auto = {choice.dtype} on {device} ({choice.reason})", flush=True
    )  # stdout: stderr is for errors
    return choice


def resolve_dtype(dtype: str | None, device: str) -> str | None:
    """A model dtype with ``auto`` replaced by ``auto_precision(device)``; other values unchanged."""
    return auto_precision(device).dtype if dtype == "auto" else dtype


def resolve_bf16(value: bool | str, use_cpu: bool, fp16: bool = False) -> bool:
    """A Trainer's ``bf16`` (true, false or auto) as a bool; auto asks the device the Trainer will run on. auto is
    false beside ``fp16``, and on a machine without a GPU unless ``use_cpu`` is set (transformers refuses bf16 on
    a CPU without it)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    if text != "auto":
        raise ConfigError(
            f"bf16: {value!r} is not true, false or auto; auto = bf16 where the device computes it natively"
        )
    if fp16 or (not use_cpu and not torch.cuda.is_available()):
        return False
    return auto_precision(training_device(use_cpu)).bf16


def training_device(use_cpu: bool) -> str:
    """The device type a Trainer runs on: "cuda" when a GPU is visible and ``use_cpu`` is off, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
