# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""`python -m visiontrim`: the main job (stock LLaVA vs VisionTrim on one photo); see `--help`."""

import argparse
import logging

from .tools.demo import add_arguments, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="visiontrim",
        description="Run one photo and a question through stock LLaVA and VisionTrim with the same weights: tokens "
        "fed to the LLM, the grid cells DVTS kept and the TGVC seeds, and prefill times.",
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
