"""Measured energy, where the hardware exposes it, to hold the proxy E against real joules.

Sources: Intel/AMD RAPL counters in ``/sys/class/powercap`` (bare-metal Linux; package
domains summed, counter wrap-around handled) and NVIDIA NVML's total-energy counter
(through ``pynvml``, when installed and a GPU is present). Virtual machines usually expose
neither; the meter then says so instead of inventing a number.

    with EnergyMeter() as m:
        train_step()
    m.joules      # dict: {"rapl": 12.3, "nvml": None}
    m.reasons     # why a source gave no reading
"""
from __future__ import annotations

import time
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")

__all__ = ["EnergyMeter", "POWERCAP"]


def _rapl_domains(root: Path):
    """Top-level RAPL package domains: (energy_uj path, max_energy_range_uj)."""
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.glob("*rapl:*")):
        if d.name.count(":") != 1:  # sub-domains (core, dram) are inside the package count
            continue
        f = d / "energy_uj"
        try:
            rng = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            rng = 0
        if f.exists():
            out.append((f, rng))
    return out


def _read_uj(domains):
    return [int(f.read_text()) for f, _ in domains]


class EnergyMeter:
    """Context manager measuring joules over its body from RAPL and NVML (each where available)."""

    def __init__(self, powercap_root: Path = POWERCAP, gpu_index: int = 0):
        self.root = Path(powercap_root)
        self.gpu_index = gpu_index
        self.joules: dict = {"rapl": None, "nvml": None}
        self.reasons: dict = {}
        self.seconds = None

    def __enter__(self):
        # each `with` block measures afresh: a reused meter showed the last block's joules or reasons
        self.joules, self.reasons, self.seconds = {"rapl": None, "nvml": None}, {}, None
        self._t0 = time.perf_counter()
        self._rapl = _rapl_domains(self.root)
        self._rapl0 = None
        if not self._rapl:
            self.reasons["rapl"] = f"no RAPL counters under {self.root} (virtual machine or non-Linux)"
        else:
            try:
                self._rapl0 = _read_uj(self._rapl)
            except OSError as exc:
                self.reasons["rapl"] = f"RAPL counters not readable: {exc}"
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            self._nvml = (pynvml, h, pynvml.nvmlDeviceGetTotalEnergyConsumption(h))  # millijoules
        except ImportError:
            self.reasons["nvml"] = "pynvml is not installed"
        except Exception as exc:  # no driver / no GPU / unsupported counter
            self.reasons["nvml"] = f"NVML unavailable: {exc}"
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        if self._rapl0 is not None:
            try:
                now = _read_uj(self._rapl)
                total = 0
                for (f, rng), a, b in zip(self._rapl, self._rapl0, now):
                    total += b - a if b >= a else b + rng - a  # one wrap-around at most
                self.joules["rapl"] = total / 1e6
            except OSError as e:
                self.reasons["rapl"] = f"RAPL counters not readable: {e}"
        if self._nvml is not None:
            pynvml, h, e0 = self._nvml
            try:
                self.joules["nvml"] = (pynvml.nvmlDeviceGetTotalEnergyConsumption(h) - e0) / 1e3
            except Exception as e:
                self.reasons["nvml"] = f"NVML read failed: {e}"
        return False
