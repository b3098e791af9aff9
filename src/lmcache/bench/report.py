"""Result rows, their targets, the printed table and the JSON document.

Every row is ``value`` next to the ``ceiling`` it is divided by; a target, where the
issue set one, is a bound on that ratio or on the value itself.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import zmq

from lmcache import __version__


@dataclass(frozen=True)
class Target:
    on: Literal["ratio", "value"]
    op: Literal[">=", "<="]
    bound: float

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None:
            return None
        return x >= self.bound if self.op == ">=" else x <= self.bound

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.bound:g}"


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str
    ceiling: str = ""
    ceiling_value: float = 0.0
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.ceiling_value if self.ceiling_value else None

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value, self.ratio) if self.target else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = str(self.target) if self.target else None
        d["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        d["met"] = self.met
        return d


def _num(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def format_table(rows: list[Row]) -> str:
    head = f"{'metric':<66}{'result':>16}  {'ceiling (same run)':<34}{'value':>12}{'ratio':>7}"
    lines: list[str] = []
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            lines += ["", f"== {section} ==", head, "-" * len(head)]
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        verdict = ""
        if r.target is not None:
            verdict = f"  {'PASS' if r.met else 'MISS'} ({r.target})"
        ceil_val = _num(r.ceiling_value) if r.ceiling else ""
        lines.append(
            f"{r.metric:<66}{_num(r.value) + ' ' + r.unit:>16}  {r.ceiling:<34}"
            f"{ceil_val:>12}{ratio:>7}{verdict}"
        )
        if r.note:
            lines.append(f"    {r.note}")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    judged = [r for r in rows if r.target is not None]
    missed = [r for r in judged if not r.met]
    out = f"targets: {len(judged) - len(missed)} of {len(judged)} met"
    for r in missed:
        shown = r.ratio if r.target and r.target.on == "ratio" else r.value
        out += f"\n  MISS {r.section} / {r.metric}: {shown:.3g} (want {r.target})"
    return out


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "msgspec": msgspec.__version__,
        "lmcache": __version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def document(rows: list[Row], config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "machine": machine(),
        "rows": [r.to_dict() for r in rows],
        "targets_met": sum(1 for r in rows if r.met),
        "targets": sum(1 for r in rows if r.target is not None),
        **extra,
    }
