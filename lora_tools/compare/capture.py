"""compare-quant's capture stage: the feed that hands each layer its input tokens (``lora_tools.model.feed``).

The whole model in memory, the model streamed block by block (``--offload``), or Gaussian inputs
(``--calib random``): the fit and evaluate stages see the same callbacks whichever feeds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_tools.model.feed import RandomFeed, model_feed, random_tokens

STREAM_BATCH_SIZE = 8


def make_feed(job: Any, progress: Callable[[int], None]) -> Any:
    """The feed of a planned job (``compare.plan.prepare_compare``)."""
    options = job.options
    if job.random:
        dims = {layer.name: layer.shape[1] for layer in job.layers}
        return RandomFeed(dims, random_tokens(options.max_tokens, options.holdout), seed=options.seed,
                          device=job.device, progress=progress)
    sequences = {"calib": job.calib_sequences, "holdout": job.holdout_sequences}
    common = {"pad_id": job.pad_id, "batch_size": options.batch_size, "device": job.device, "progress": progress}
    if job.stream is not None:
        # Smaller batches through one block at a time: the block's own temporaries (an MLP's intermediate
        # activations are batch x seq x intermediate floats, several times) bound a streamed run's peak.
        common["batch_size"] = min(options.batch_size, STREAM_BATCH_SIZE)
    model_names = {layer.name: layer.model_name for layer in job.layers}
    return model_feed(job.model, job.stream, job.modules, model_names, sequences, **common)
