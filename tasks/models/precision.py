"""Compute precision of the language model's forward/backward passes (the latent math always stays fp32).

One process-wide setting, read from `LATENTPREF_LM_DTYPE` (auto | bf16 | fp32) so that every process of a night
(the driver, Ray tasks, Ray Train workers: the flows pass it in the Ray runtime environment) computes alike:
- bf16: LM matmuls under `torch.autocast(bfloat16)`; weights, optimiser state and everything outside the LM stay
  fp32 (autocast rather than bf16 weights: the same checkpoint serves both settings, and Adam updates stay exact).
  Measured on SmolLM2-135M, 2 threads, AVX512-BF16 CPU: forward+backward 195 -> 350-480 tokens/s, forward
  440-490 -> 1,065-1,575 tokens/s (shared ECOSYSTEM.md §7).
- fp32: plain fp32 (unit tests that compare numbers pin it).
- auto (default): bf16 on a CUDA device that supports it or a CPU with native bf16 (AVX512-BF16 or AMX), else fp32.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Literal

import torch

ENV_VAR = "LATENTPREF_LM_DTYPE"
Setting = Literal["auto", "bf16", "fp32"]
SETTINGS: tuple[str, ...] = ("auto", "bf16", "fp32")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve(setting: str, device: str = "cpu") -> torch.dtype:
    """torch dtype of a setting on a device type ("cpu" or "cuda").

    Raises:
        ValueError: an unknown setting (names the accepted ones).
    """
    if setting not in SETTINGS:
        raise ValueError(f"lm_dtype={setting!r}; expected one of {SETTINGS}")
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def setting() -> str:
    """The process's setting (`LATENTPREF_LM_DTYPE`, default auto)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV_VAR}={value!r}; expected one of {SETTINGS}")
    return value


def set_setting(value: str) -> None:
    """Set the process's setting (and so that of every Ray worker started after it with the flows' runtime env)."""
    if value not in SETTINGS:
        raise ValueError(f"lm_dtype={value!r}; expected one of {SETTINGS}")
    os.environ[ENV_VAR] = value


def lm_dtype(device: str = "cpu") -> torch.dtype:
    return resolve(setting(), device)


def lm_autocast(device: torch.device | str = "cpu"):
    """Context for LM forward/backward passes: bf16 autocast when the setting resolves to bf16, else nothing.

    Only for fp32 models (a model already stored in bf16/fp16 runs in its own dtype)."""
    kind = torch.device(device).type
    if lm_dtype(kind) == torch.bfloat16:
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32():
    """Context that turns autocast off: the latent heads and densities compute in fp32 inside an LM autocast."""
    return torch.autocast("cpu", enabled=False) if not torch.cuda.is_available() else _both_off()


@contextlib.contextmanager
def _both_off():
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def cache_dtype(default: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """dtype for K/V written into a cache by hand: the autocast dtype while an LM autocast is on (the base's own
    new K/V come out of autocast linears in it, and a cache must hold one dtype), else `default`."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return default


def under_lm_autocast(fn):
    """Decorator: run `fn` under `lm_autocast` on the device of its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with lm_autocast(device):
            return fn(*args, **kwargs)
    return wrapper
