"""Summaries, target ratios, the printed table and the plot of benchmarks/vllm_e2e.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .targets import summarize_more

Run = dict[str, Any]


def _ms(values: Sequence[float], q: float = 50) -> float:
    return 1e3 * float(np.percentile(values, q))


def summarize(runs: Sequence[Run], configs: Sequence[str]) -> dict[str, Any]:
    """Medians and p90 per config, pooling the raw timings of all its passes."""
    summary: dict[str, Any] = {}
    for name in configs:
        ok = [r for r in runs if r["config"] == name and not r.get("error")]
        if not ok:
            continue
        ttft: dict[str, Any] = {}
        for length in ok[0].get("ttft", {}):
            entry: dict[str, float] = {}
            for phase in ("cold", "warm"):
                values = [v for r in ok for v in r["ttft"][length][f"{phase}_s"]]
                entry[f"{phase}_ms"] = _ms(values)
                entry[f"{phase}_p90_ms"] = _ms(values, 90)
            ttft[length] = entry
        summary[name] = {
            "startup_s": float(np.median([r["startup_s"] for r in ok])),
            "foreign_cores_max": max((load for _, load in _loads(ok)), default=0.0),
            "ttft": ttft,
            "chat": _chat_summary(ok),
            **summarize_more(ok),
        }
    return summary


def _loads(runs: Sequence[Run]) -> list[tuple[str, float]]:
    """(phase, cores used by other processes) of every measured phase of these runs."""
    out = []
    for r in runs:
        where = f"{r['config']} pass {r['pass'] + 1}"
        for length, entry in r.get("ttft", {}).items():
            if "load" in entry:
                out.append((f"{where}, {length} tokens", entry["load"]["foreign_cores"]))
        if r.get("chat") and "load" in r["chat"]:
            out.append((f"{where}, chat", r["chat"]["load"]["foreign_cores"]))
        for key in ("capacity", "restart", "two", "decode"):
            for field in ("load", "load2"):
                if r.get(key) and field in r[key]:
                    out.append((f"{where}, {key}", r[key][field]["foreign_cores"]))
    return out


def load_warnings(runs: Sequence[Run], threshold: float = 0.15) -> list[str]:
    return [
        f"other processes used {load:.2f} cores during {phase}: its timings are suspect"
        for phase, load in _loads(runs)
        if load > threshold
    ]


def _chat_summary(runs: Sequence[Run]) -> dict[str, Any] | None:
    requests = [q for r in runs if r.get("chat") for q in r["chat"]["requests"]]
    if not requests:
        return None
    rounds = sorted({q["round"] for q in requests})
    return {
        "median_ms": _ms([q["ttft_s"] for q in requests]),
        "p90_ms": _ms([q["ttft_s"] for q in requests], 90),
        "per_round_ms": [_ms([q["ttft_s"] for q in requests if q["round"] == n]) for n in rounds],
        "wall_s": float(np.median([r["chat"]["wall_s"] for r in runs if r.get("chat")])),
        # (user, round) -> median over passes: the same request in every configuration
        "per_request_ms": {
            key: _ms([q["ttft_s"] for q in requests if f"{q['user']}:{q['round']}" == key])
            for key in sorted({f"{q['user']}:{q['round']}" for q in requests})
        },
    }


def print_report(summary: dict[str, Any], n: int, warnings: list[str]) -> None:
    if not summary:
        print("No configuration completed.")
        return
    lengths = list(next(iter(summary.values()))["ttft"])
    if not lengths and not any(s["chat"] for s in summary.values()):
        return
    print(f"\nTTFT medians in ms ({n} prompts per length and pass; cold = first time, ")
    print("warm = the same prompts again; p90 and raw timings in the JSON)")
    head = f"{'config':16s} {'startup':>8s}"
    for length in lengths:
        head += f" {length + ' cold':>10s} {length + ' warm':>10s}"
    print(head + f" {'chat':>8s} {'others':>6s}")
    for name, s in summary.items():
        line = f"{name:16s} {s['startup_s']:7.1f}s"
        for length in lengths:
            t = s["ttft"].get(length)
            line += f" {t['cold_ms']:10.1f} {t['warm_ms']:10.1f}" if t else f" {'-':>10s}" * 2
        chat = s["chat"]
        line += f" {chat['median_ms']:8.1f}" if chat else f" {'-':>8s}"
        print(line + f" {s['foreign_cores_max']:6.2f}")
    print("(others: the most cores that processes outside the benchmark used in any phase)")
    if any(s["chat"] for s in summary.values()):
        print("\nChat: median TTFT per round (ms), all rounds, wall time of the workload")
        for name, s in summary.items():
            chat = s["chat"]
            if chat:
                rounds = " ".join(f"{v:7.1f}" for v in chat["per_round_ms"])
                print(
                    f"{name:16s} {rounds}   all {chat['median_ms']:7.1f}"
                    f"   wall {chat['wall_s']:6.1f} s"
                )
    for warning in warnings:
        print(f"WARNING: {warning}")


def plot(summary: dict[str, Any], path: Path, title: str) -> bool:
    """TTFT vs prompt length (cold, warm) and chat TTFT per round; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); pip install matplotlib")
        return False
    has_chat = any(s["chat"] for s in summary.values())
    if not any(s["ttft"] for s in summary.values()):
        return False
    fig, axes = plt.subplots(1, 3 if has_chat else 2, figsize=(16 if has_chat else 11, 5))
    for ax, phase in zip(axes[:2], ("cold", "warm"), strict=True):
        for name, s in summary.items():
            lengths = [int(x) for x in s["ttft"]]
            med = [s["ttft"][x][f"{phase}_ms"] for x in s["ttft"]]
            p90 = [s["ttft"][x][f"{phase}_p90_ms"] for x in s["ttft"]]
            line = ax.plot(lengths, med, marker="o", label=name)[0]
            ax.plot(lengths, p90, linestyle=":", color=line.get_color(), alpha=0.6)
        ax.set(xlabel="prompt tokens", ylabel="TTFT ms (median; dotted: p90)", yscale="log")
        ax.set_xscale("log")
        ticks = sorted({int(x) for s in summary.values() for x in s["ttft"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        _log_y(ax)
        ax.set_title(f"{phase}: " + ("first time" if phase == "cold" else "same prompt again"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if has_chat:
        _chat_panel(axes[2], summary)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _chat_panel(chat_ax: Any, summary: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, s in summary.items():
        if s["chat"]:
            per_round = s["chat"]["per_round_ms"]
            chat_ax.plot(range(1, len(per_round) + 1), per_round, marker="o", label=name)
    chat_ax.set(xlabel="chat round", ylabel="TTFT ms (median over users)", yscale="log")
    chat_ax.set_title("multi-round chat")
    chat_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _log_y(chat_ax)
    chat_ax.grid(True, which="both", alpha=0.3)
    chat_ax.legend()


def _log_y(ax: Any) -> None:
    """Plain millisecond labels at 1-2-5 steps on a log axis (no 2x10^2 notation)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
