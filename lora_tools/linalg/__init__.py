"""Exact low-rank algebra on LoRA factors, without forming the dense out x in update."""

from lora_tools.linalg.lowrank import LowRankSVD, lowrank_svd, single_threaded, singular_values
from lora_tools.linalg.metrics import SpectrumMetrics, spectrum_metrics

__all__ = ["LowRankSVD", "SpectrumMetrics", "lowrank_svd", "single_threaded", "singular_values", "spectrum_metrics"]
