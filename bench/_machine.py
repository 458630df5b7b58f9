"""What the machine did during a measurement: CPU seconds used, CPU time stolen, CPU used by others.

Wall-clock throughput on a shared virtual machine moves with its neighbours (this one varied by
±15% in a day, with up to a third of its CPU time stolen). Each benchmark therefore also prints
the CPU seconds it used, the steal share of the machine's time and the share other processes used
while it ran, so a figure can be read against the conditions it was taken in.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
IDLE_FIELDS, STEAL_FIELD = (3, 4), 7  # user nice system idle iowait irq softirq steal ... (proc(5))


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(steal, busy, total) jiffies of all CPUs since boot, or None where /proc/stat is not there."""
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields[:8]]  # guest time is already counted in user
    busy = sum(v for i, v in enumerate(values) if i not in IDLE_FIELDS and i != STEAL_FIELD)
    return values[STEAL_FIELD], busy, sum(values)


def _cpu_seconds() -> float:
    """User + system seconds of this process and of the children it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Conditions:
    """Between start() and stop(): CPU seconds of this process tree, the machine's steal and other-work shares."""

    cpu_s: float = 0.0
    steal_pct: float | None = None
    others_pct: float | None = None

    def start(self) -> Conditions:
        self._cpu, self._jiffies = _cpu_seconds(), _cpu_jiffies()
        return self

    def stop(self) -> Conditions:
        self.cpu_s = _cpu_seconds() - self._cpu
        end = _cpu_jiffies()
        if self._jiffies is not None and end is not None and end[2] > self._jiffies[2]:
            steal, busy, total = (b - a for a, b in zip(self._jiffies, end, strict=True))
            self.steal_pct = 100.0 * steal / total
            ours = self.cpu_s * os.sysconf("SC_CLK_TCK")
            self.others_pct = max(0.0, 100.0 * (busy - ours) / total)
        return self

    def shares(self) -> str:
        """The machine's CPU time that was stolen or used by other processes, as text."""
        def pct(value: float | None) -> str:
            return "unknown" if value is None else f"{value:.0f}%"

        return f"CPU steal {pct(self.steal_pct)}, other processes {pct(self.others_pct)}"

    def describe(self, rows: int) -> str:
        return f"{self.cpu_s:.1f} CPU s ({1e6 * self.cpu_s / rows:,.0f} CPU us per source row), {self.shares()}"
