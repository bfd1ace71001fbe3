"""Truncation vs quantization of a weight or LoRA update, measured on real layer outputs (``compare-quant``)."""

from lora_tools.compare.options import CompareOptions, parse_ranks, parse_schemes
from lora_tools.compare.plan import prepare_compare
from lora_tools.compare.run import CompareJob

__all__ = ["CompareJob", "CompareOptions", "parse_ranks", "parse_schemes", "prepare_compare"]
