# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""matplotlib for the tools' plots, optional: without it a tool still finishes and writes its JSON."""

import functools
import logging
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
