"""Result rows, their targets, the printed table and the JSON document.

Every row is ``value`` next to the ``ceiling`` it is divided by; a target, where the
issue set one, is a bound on that ratio or on the value itself.

Targets are set for the default size (`options.DEFAULT_TOKENS` per call). A smaller run
(``--quick``: a quarter of it) can miss a ratio target only because each call is shorter:
a per-call cost that the ceiling does not pay (a round trip, a lock, a commit) weighs more
on fewer bytes. `size_projection` says, for a row that declares its ``tokens`` per call,
what its ratio would be at the default size if its whole gap to the ceiling were such a
fixed cost; a miss that this projection would pass is printed as expected at that size.
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
    tokens: int = 0
    """Tokens per call, for rows whose ceiling moves the same bytes (0: not size-bound)."""

    @property
    def ratio(self) -> float | None:
        return self.value / self.ceiling_value if self.ceiling_value else None

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value, self.ratio) if self.target else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = str(self.target) if self.target else None
        # Four significant digits, not four decimals: a ratio of 0.04 keeps its precision.
        d["ratio"] = None if self.ratio is None else float(f"{self.ratio:.4g}")
        d["met"] = self.met
        return d


def size_projection(row: Row, default_tokens: int) -> float | None:
    """The ratio at ``default_tokens`` per call if the gap to the ceiling is per call:
    time t = c + e (c the ceiling's time, e fixed), so at k times the bytes the ratio
    r = c/t becomes k / (k + 1/r - 1). None where it does not apply."""
    ratio = row.ratio
    if not row.tokens or row.tokens >= default_tokens or not ratio or row.target is None:
        return None
    if row.target.on != "ratio" or row.target.op != ">=":
        return None
    k = default_tokens / row.tokens
    return k / (k + max(1 / ratio - 1, 0.0))


def expected_at_size(row: Row, default_tokens: int) -> str:
    """A note for a miss that the smaller size explains ("" for any other row)."""
    if row.met is not False or row.target is None:
        return ""
    projected = size_projection(row, default_tokens)
    if projected is None or not row.target.met(row.value, projected):
        return ""
    return (
        f"expected at {row.tokens} tokens per call: the same gap as a fixed per-call cost "
        f"gives {projected:.2f} at {default_tokens} (the size the target is for)"
    )


def _num(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}" if x >= 10 else f"{x:.3f}"


def format_table(rows: list[Row], default_tokens: int = 0) -> str:
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
        if sized := expected_at_size(r, default_tokens):
            lines.append(f"    {sized}")
    return "\n".join(lines)


def summary(rows: list[Row], default_tokens: int = 0) -> str:
    judged = [r for r in rows if r.target is not None]
    missed = [r for r in judged if not r.met]
    sized = [r for r in missed if expected_at_size(r, default_tokens)]
    out = f"targets: {len(judged) - len(missed)} of {len(judged)} met"
    if sized:
        out += (
            f"; {len(sized)} of the misses expected at {sized[0].tokens} tokens per call "
            f"(marked; run with the default --tokens {default_tokens} to judge them)"
        )
    for r in missed:
        shown = r.ratio if r.target and r.target.on == "ratio" else r.value
        mark = " (expected at this size)" if r in sized else ""
        out += f"\n  MISS {r.section} / {r.metric}: {shown:.3g} (want {r.target}){mark}"
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
