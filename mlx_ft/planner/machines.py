"""Machine profiles: Apple Silicon chips x memory sizes, read from machines.json (data, not code).

A profile gives the GPU working-set budget the planner compares against, and the memory bandwidth
and GPU FLOP/s the time estimate uses. `auto` reads the real values on a Mac (`mx.device_info()`)
and, elsewhere, uses this machine's RAM and MLX's memory limit.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..errors import PlanError

GB = 10**9
GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Machine:
    name: str
    chip: str
    memory_bytes: int
    budget_bytes: int
    """GPU working-set budget: what MLX may keep resident (Metal recommendedMaxWorkingSetSize)."""
    budget_source: str
    bandwidth_gbs: float | None = None
    fp32_tflops: float | None = None
    bf16_native: bool = True
    gpu_cores: int | None = None
    is_mac: bool = True
    matmul_tflops: tuple[float, float] | None = None
    """(low, high) published 16-bit matmul TFLOP/s of GPU cores with matrix units (M5 Neural
    Accelerators); None: matmuls run on the FP32 ALUs."""
    matmul_source: str = ""
    projected: str | None = None
    """Why and from what the figures are projected (a chip not announced yet); None when sold."""

    def tflops(self, dtype: str) -> float | None:
        """Peak matmul TFLOP/s for `dtype`; bf16 is emulated at about half rate on M1/M2."""
        if self.fp32_tflops is None:
            return None
        return self.fp32_tflops / 2 if dtype == "bfloat16" and not self.bf16_native else self.fp32_tflops


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads((Path(__file__).parent / "machines.json").read_text())


def default_budget(memory_bytes: int, rule: str | None = None) -> tuple[int, str]:
    """The macOS default GPU working set for this much RAM, from the rule in machines.json."""
    rules = _data()["budget_rules"]
    rule = rule or rules["default"]
    gb = memory_bytes / GIB
    frac = next(r["fraction"] for r in rules[rule] if gb <= r["max_memory_gb"])
    return int(memory_bytes * frac), f"{frac:.0%} of RAM ({rule} default working set)"


def matmul_rate(chip: str, gpu_cores: int | None) -> tuple[tuple[float, float] | None, str]:
    """(low, high) matmul TFLOP/s of `gpu_cores` cores of `chip` with their sources, from
    machines.json's matmul_rates (per core, so a binned chip scales); (None, "") without matrix units."""
    rates = _data()["matmul_rates"]
    entry = rates.get(chip)
    if entry is None or not gpu_cores:
        return None, ""
    base = rates[entry.get("same_as", chip)]
    lo, hi = (round(r * gpu_cores, 1) for r in base["per_core_tflops"])
    return (lo, hi), "; ".join(base["sources"])


def list_machines() -> list[Machine]:
    out = []
    for m in _data()["machines"]:
        mem = m["memory_gb"] * GIB
        budget, why = default_budget(mem)
        rate, source = matmul_rate(m["chip"], m["gpu_cores"])
        out.append(Machine(name=m["name"], chip=m["chip"], memory_bytes=mem, budget_bytes=budget,
                           budget_source=why, bandwidth_gbs=m["bandwidth_gbs"], fp32_tflops=m["fp32_tflops"],
                           bf16_native=m["bf16_native"], gpu_cores=m["gpu_cores"], matmul_tflops=rate,
                           matmul_source=source, projected=m.get("projected")))
    return out


def os_reserve_bytes() -> int:
    return int(_data()["budget_rules"]["os_reserve_gb"] * GIB)


def get_machine(name: str = "auto", budget_gb: float | None = None) -> Machine:
    """A profile by name (`m4-max-128`), or `auto` for this machine.

    Raises:
        PlanError: the name is unknown; the message lists the known names.
    """
    if name == "auto":
        m = machine_from_device_info(_device_info())
    else:
        by_name = {m.name: m for m in list_machines()}
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            did = f"did you mean {', '.join(close)}? " if close else ""
            raise PlanError(f"--machine: unknown machine {name!r}; {did}known machines: "
                            f"{', '.join(by_name)} (or `auto`); `mlxft machines` shows them with their "
                            "budgets")
        m = by_name[name]
    if budget_gb is not None:
        m = replace(m, budget_bytes=int(budget_gb * GIB), budget_source="--budget-gb")
    return m


def _device_info() -> dict:
    import mlx.core as mx

    info = dict(mx.device_info())
    if "memory_size" not in info:  # CPU backend (Linux, CI): no memory keys; use the OS's figures
        info["memory_size"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["mlx_memory_limit"] = mx.get_memory_limit()
    return info


def machine_from_device_info(info: dict) -> Machine:
    """This machine's profile from `mx.device_info()` (the Mac-only path, testable anywhere).

    On a Mac, Metal reports `memory_size` and `max_recommended_working_set_size` (which already
    reflects `iogpu.wired_limit_mb`); the chip is looked up by `device_name` ("Apple M4 Max") for
    bandwidth and FLOP/s. Elsewhere the budget is MLX's memory limit (0.8 x RAM on the CPU backend).
    """
    mem = int(info["memory_size"])
    name = str(info.get("device_name", "unknown"))
    if "max_recommended_working_set_size" in info:
        chip = name.removeprefix("Apple ").strip()
        known = [m for m in list_machines() if m.chip == chip]
        # Binned and full variants share a name; the one with this memory size, else the closest.
        ref = min(known, key=lambda m: abs(m.memory_bytes - mem), default=None)
        # Memory and budget are this Mac's own; the rates come from the profile, still projected if it was.
        projected = f"memory and budget read from this Mac; rates projected: {ref.projected}" \
            if ref and ref.projected else None
        return Machine(name="auto", chip=chip, memory_bytes=mem,
                       budget_bytes=int(info["max_recommended_working_set_size"]),
                       budget_source="this Mac's max_recommended_working_set_size (mx.device_info)",
                       bandwidth_gbs=ref.bandwidth_gbs if ref else None,
                       fp32_tflops=ref.fp32_tflops if ref else None,
                       bf16_native=ref.bf16_native if ref else True,
                       gpu_cores=ref.gpu_cores if ref else None,
                       matmul_tflops=ref.matmul_tflops if ref else None,
                       matmul_source=ref.matmul_source if ref else "", projected=projected)
    limit = int(info.get("mlx_memory_limit") or 0.8 * mem)
    return Machine(name="auto", chip=name, memory_bytes=mem, budget_bytes=limit,
                   budget_source="MLX memory limit on this non-Mac machine (CPU backend)", is_mac=False)


def sysctl_advice(machine: Machine, required_bytes: int) -> str | None:
    """The `iogpu.wired_limit_mb` command that would make room, with its risk; None if it cannot."""
    if not machine.is_mac:
        return None
    ceiling = machine.memory_bytes - os_reserve_bytes()
    if required_bytes > ceiling:
        return None
    mb = -(-required_bytes // MIB)
    mb = max(mb, machine.budget_bytes // MIB + 1)
    return (f"sudo sysctl iogpu.wired_limit_mb={mb}  # raises the GPU budget to {mb / 1024:.1f} GiB until "
            f"reboot; leaves macOS and other apps {(machine.memory_bytes - mb * MIB) / GIB:.1f} GiB of "
            f"{machine.memory_bytes / GIB:.0f} GiB; if they need more, macOS swaps (slow) or kills "
            "processes. Undo with `sudo sysctl iogpu.wired_limit_mb=0`.")
