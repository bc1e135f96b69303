# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""matplotlib for the tools' plots, optional: without it a tool still finishes and writes its JSON."""

import functools
import logging
from pathlib import Path
from types import ModuleType


logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "visiontrim[tools]" (or pip install matplotlib)'


def pyplot() -> ModuleType | None:
    """matplotlib's `pyplot` on the Agg backend; None when matplotlib is not installed (said once, with the fix)."""
    try:
        import matplotlib
    except ImportError:
        warn_missing_matplotlib()
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as module

    return module


@functools.cache
def warn_missing_matplotlib() -> None:
    logger.warning(
        "matplotlib is not installed: the PNG plots are not drawn (the JSON results are written as usual). To draw "
        "them: %s, then run again.",
        INSTALL_HINT,
    )


def speedup_plot(
    path: Path, title: str, lines: list[tuple[list[int], list[float], str, str]], log_tokens: bool = False
) -> bool:
    """
    The benchmarks' plot: speed-ups over stock against the visual tokens kept, one line per `(tokens, speed-ups,
    matplotlib style, label)`, saved to `path`; False when matplotlib is missing (nothing drawn).
    """
    pyplot_module = pyplot()
    if pyplot_module is None:
        return False
    figure, axes = pyplot_module.subplots(figsize=(6, 4), dpi=120)
    for tokens, speedups, style, label in lines:
        axes.plot(tokens, speedups, style, label=label)
    if log_tokens:
        axes.set_xscale("log")
    axes.set_xlabel("visual tokens into the LLM")
    axes.set_ylabel("x faster than stock (same weights, same run)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8 if len(lines) > 3 else None)
    figure.tight_layout()
    figure.savefig(path)
    pyplot_module.close(figure)
    return True
