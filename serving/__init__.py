"""Serving engines for VisionTrim folders: the vLLM plugin (`vllm_plugin`, registered with vLLM by entry point)."""
