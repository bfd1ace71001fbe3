"""Truncation vs quantization of a weight or LoRA update, measured on real layer outputs (``compare-quant``)."""

from lora_tools.compare.run import CompareJob, CompareOptions, parse_ranks, parse_schemes, prepare_compare

__all__ = ["CompareJob", "CompareOptions", "parse_ranks", "parse_schemes", "prepare_compare"]
