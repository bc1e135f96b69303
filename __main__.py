# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
`python -m visiontrim [options]`: the main job (stock vs VisionTrim on one photo);
`python -m visiontrim bench [options]`: the benchmark;
`python -m visiontrim bench-vllm [options]`: the vLLM serving benchmark;
`python -m visiontrim eval run|score [options]`: the evaluation runner;
`python -m visiontrim analyze [options]`: attention analysis;
`python -m visiontrim verify PATH`: check a converted folder against its SHA-256 checksums. `--help` after any lists
its options.
"""

import argparse
import logging
import sys

from .tools import analysis, bench, checksums, demo, vllm_bench
from .tools.arguments import UsageError
from .tools.evaluation import cli as evaluation
from .tools.evaluation.data import DataError


COMMANDS = {
    "bench": (
        bench,
        "Stock vs VisionTrim with the same weights at the published budgets: speed, FLOPs, memory.",
    ),
    "bench-vllm": (
        vllm_bench,
        "Stock LLaVA (or Qwen2.5-VL, with vLLM's EVS) vs VisionTrim served by vLLM with the same weights: KV-cache "
        "capacity, throughput, time to first token (runs vLLM in its own environment).",
    ),
    "eval": (
        evaluation,
        "Answer a benchmark with a model folder and score it like the papers do, or score an answers file.",
    ),
    "analyze": (
        analysis,
        "Attention shift and dispersion of the LLM over the visual tokens, layer by layer (stock and VisionTrim).",
    ),
    "verify": (
        checksums,
        "Check a converted model folder against the SHA-256 checksums visiontrim-convert wrote (checksums.sha256).",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module, description = COMMANDS[argv[0]]
        parser = argparse.ArgumentParser(prog=f"visiontrim {argv[0]}", description=description)
        argv = argv[1:]
    else:
        module = demo
        parser = argparse.ArgumentParser(
            prog="visiontrim",
            description="Run one photo and a question through stock and VisionTrim with the same weights: tokens "
            "fed to the LLM, the grid cells DVTS kept and the TGVC seeds, and prefill times. Subcommands: "
            + ", ".join(COMMANDS)
            + ".",
        )
    module.add_arguments(parser)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        module.run(arguments)
    except UsageError as error:
        parser.error(str(error))
    except DataError as error:  # an input file that is not what the command needs: one line, as a usage error
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
