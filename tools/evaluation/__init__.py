# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""The evaluation runner: benchmark data, generation, and the scorers of the LLaVA papers' benchmarks."""
