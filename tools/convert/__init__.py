# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The checkpoint converter (`visiontrim-convert`): `cli` is the command line, `llava` and `qwen` read each family's
stock checkpoints, and `repository` writes the VisionTrim folder both produce.
"""

from .cli import convert, main, parse_arguments
from .repository import ConversionError


__all__ = ["ConversionError", "convert", "main", "parse_arguments"]
