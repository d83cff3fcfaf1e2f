"""The retrieval heatmap: exact-match accuracy over prompt lengths x needle depths (needs matplotlib: pip install
"llama_jax[plots]").

    plot_heatmap(evaluate(...), "passkey.png")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_jax.errors import ConfigError
from llama_jax.eval.retrieval.score import RetrievalResult


def require_matplotlib():
    """matplotlib's Figure class, or a ConfigError saying how to install it."""
    try:  # matplotlib is optional (the "plots" extra); pyplot is avoided so no global backend is chosen
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'llama_jax[plots]'") from None
    return Figure


def plot_heatmap(result: RetrievalResult, path: str | Path | None = None):
    """A lengths x depths heatmap of accuracy (depth 0 at the top), saved to ``path`` when given; returns the Figure."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(1.2 + 0.9 * len(result.lengths), 1.0 + 0.55 * len(result.depths)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(result.accuracy.T, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for (col, row), value in np.ndenumerate(result.accuracy):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_xlabel(f"prompt length ({result.tokenizer} tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{result.task.kind} retrieval, {result.samples} samples per cell")
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
