"""PNG line charts for the benchmarks (matplotlib, Agg backend, imported only when plotting).

matplotlib is optional (`pip install 'triforce[bench]'`); without it the benchmarks still write
their JSON and Markdown and say in one line that the plots were skipped.
"""

from __future__ import annotations

from pathlib import Path

Series = dict[str, list[tuple[float, float | None]]]

MISSING = "matplotlib is not installed (pip install matplotlib): plots skipped"


def line_plot(path: Path, series: Series, title: str, xlabel: str, ylabel: str, log2_x: bool = False,
              hline: float | None = None) -> str | None:
    """One line per series (points with a None value are left out). Returns a note instead of
    writing when matplotlib is missing, else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MISSING
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        kept = sorted((x, y) for x, y in points if y is not None)
        if kept:
            ax.plot([x for x, _ in kept], [y for _, y in kept], marker="o", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8, linestyle="--", label="autoregressive")
    if log2_x:
        ax.set_xscale("log", base=2)
    xs = sorted({x for points in series.values() for x, y in points if y is not None})
    if xs:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
