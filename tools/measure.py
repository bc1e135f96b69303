# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
What the benchmarks measure, whatever the architecture: timed runs (`Timing`, `timings`), analytic prefill FLOPs,
KV-cache bytes, peak memory, and a description of the machine.
"""

import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers


# What a benchmark table shows in place of a figure below the timer's noise.
NOISE = "noise"


@dataclass
class Timing:
    """Seconds of the timed runs after warm-up."""

    runs: list[float]

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        """Largest minus smallest run: how far apart the same work timed (0 for a single run)."""
        return max(self.runs) - min(self.runs)


def timings(function: Callable[[], object], warmup: int, repeats: int) -> Timing:
    """Seconds of `repeats` calls after `warmup` calls; CUDA work is waited for (kernels run asynchronously)."""

    def synchronize() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        function()
    runs = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        runs.append(time.perf_counter() - start)
    return Timing(runs)


def time_per_step(longer: Timing, shorter: Timing, steps: int) -> float | None:
    """
    Seconds per step of the `steps` steps `longer` runs beyond `shorter` (decoded tokens, say), from their minima;
    None when the difference is within the timer's noise: not above the spread of either timing's runs, nor above
    the clock's resolution (a single run has no spread, so only a difference of zero or less is caught then).
    """
    difference = longer.min - shorter.min
    noise = max(longer.spread, shorter.spread, time.get_clock_info("perf_counter").resolution)
    return difference / steps if difference > noise else None


def noise_note(new_tokens: int) -> str:
    """The line under a benchmark table that explains its `NOISE` entries."""
    return (
        f"decode ms {NOISE!r}: generating {new_tokens} tokens did not take longer than generating 1 by more than the "
        "spread of the runs or the clock's resolution, the timer's noise; more --repeats or --new-tokens measure it"
    )


def ratio(value: float | None, reference: float | None) -> float | None:
    """`value / reference`, None when either is missing (a figure below the timer's noise)."""
    return value / reference if value is not None and reference is not None else None


def prefill_flops(
    text_config,
    sequence_length: int,
    pruned_length: int | None = None,
    pruned_from: int | None = None,
    merges: int = 3,
) -> int:
    """
    Analytic FLOPs of a decoder prefill over `sequence_length` tokens, layer by layer (a multiply-add is 2 FLOPs; the
    full, non-causal score matrix is counted; norms, activations, softmax and RoPE are left out; the LM head runs on
    the last token): per layer over n tokens `2n*d*(h + 2h_kv)*d_h + 2n*h*d_h*d + 4n^2*h*d_h + 6n*d*m`, plus `2d*V`.
    With the LLM stage, layers from `pruned_from` on run over `pruned_length` tokens, and the rerank costs layer
    `pruned_from - 1`'s query, key and score recomputation, `2n*d*(h + h_kv)*d_h + 2n^2*h*d_h`, plus `merges`
    token-similarity passes of `2n^2*d`.
    """
    d, m = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads

    def layer(n: int) -> int:
        return (
            2 * n * d * (heads + 2 * kv_heads) * head_dim
            + 2 * n * heads * head_dim * d
            + 4 * n * n * heads * head_dim
            + 6 * n * d * m
        )

    layers = text_config.num_hidden_layers
    head = 2 * d * text_config.vocab_size
    if pruned_from is None:
        return layers * layer(sequence_length) + head
    n = sequence_length
    rerank = 2 * n * d * (heads + kv_heads) * head_dim + 2 * n * n * heads * head_dim + merges * 2 * n * n * d
    return pruned_from * layer(n) + (layers - pruned_from) * layer(pruned_length) + rerank + head


def kv_cache_bytes(cache) -> int:
    """Bytes held by a filled cache's keys and values, all layers."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def peak_memory_bytes(function: Callable[[], object], device: torch.device) -> int | None:
    """
    Peak memory `function` adds above what is allocated before it runs: the CUDA allocator's peak on GPU; on Linux,
    the process's resident-set high-water mark (reset through /proc/self/clear_refs, freed heap returned to the system
    first with malloc_trim). None elsewhere.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not sys.platform.startswith("linux"):
        return None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    function()
    return (_proc_status_kib("VmHWM") - before) * 1024


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor()
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
