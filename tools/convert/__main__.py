# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""`python -m visiontrim.tools.convert`: `visiontrim-convert`."""

from .cli import main


main()
