"""A picture of a solve: measured peak against tokens per micro-batch, per rank, with the budget."""

from __future__ import annotations

from pathlib import Path

from autotune.techniques import Knobs
from autotune.units import GiB


def _techniques(trial: dict) -> str:
    """A trial's techniques as its label ("ckpt+fused+packed"); "" for a trial recorded without them."""
    return Knobs.from_dict(trial["knobs"]).describe() if trial.get("knobs") else ""


def plot_profile(profile: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    trials = profile["trials"]
    budget = profile["constraints"]["max_memory_gb"]
    usable = profile["constraints"]["usable_bytes"] / GiB
    choice = profile["choice"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    groups = sorted({(t["rank"], _techniques(t)) for t in trials})
    for rank, techniques in groups:
        name = f"rank {rank}" + (f", {techniques}" if techniques else "")
        mine = [t for t in trials if t["rank"] == rank and _techniques(t) == techniques]
        fits = [t for t in mine if t["peak_bytes"]]
        ax.plot(
            [t["batch"] * t["seq"] for t in fits],
            [t["peak_bytes"] / GiB for t in fits],
            "s" if techniques.startswith("no-ckpt") else "o",
            label=f"{name} (measured)",
        )
        ooms = [t for t in mine if t["oom"]]
        if ooms:
            ax.plot(
                [t["batch"] * t["seq"] for t in ooms],
                [budget] * len(ooms),
                "x",
                color="red",
                markersize=9,
                label=f"{name}: out of memory",
            )
    ax.axhline(budget, color="red", linestyle="-", linewidth=1, label=f"budget {budget:g} GiB")
    ax.axhline(
        usable,
        color="orange",
        linestyle="--",
        linewidth=1,
        label=f"budget less {profile['constraints']['margin']:.0%} margin",
    )
    peak = profile["measurement"]["peak_bytes"] / GiB
    ax.plot(
        [choice["batch_size"] * choice["max_sequence_length"]],
        [peak],
        "*",
        color="green",
        markersize=16,
        label=f"choice: batch {choice['batch_size']} x seq {choice['max_sequence_length']}, r={choice['lora_r']}",
    )
    ax.set_xlabel("tokens per micro-batch (batch x sequence length)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"{profile['model']['name']} on {profile['hardware'].get('gpu_name') or 'CPU (simulated cap)'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
