"""Multi-source LoRA merging on the server side: N adapters or fine-tunes -> one rank-K adapter.

- :func:`load_sources` reads peft adapter folders (scale alpha / r, this project's
  ``base_delta.safetensors``) and full fine-tuned model folders (W_ft − W_0 against a base), and
  checks that they target the same modules with the same shapes.
- :func:`merge_adapters` keeps, per layer, the top K rank-one SVD components pooled across the
  sources (AXIS, :func:`kernels.top_components`); :func:`add_adapter` folds one more source into
  a saved merge (Brand's update, :func:`kernels.add_source`); :func:`save_merged` writes a peft
  adapter (B = U diag(S), A = Vh, alpha = K) that ``PeftModel.from_pretrained`` loads.
- Baselines: :func:`task_arithmetic`, :func:`ties`, :func:`peft_svd`.
- ``python -m merging``: the command line (:mod:`merging.cli`).

Low-rank sources are never expanded to m × n; only sources without factors (full models,
base_delta) are, and TIES, which works on single entries. Imports torch, peft, safetensors,
transformers and ``kernels``; no Flower.
"""

from merging.adapter_io import MergedAdapter, read_provenance, save_merged
from merging.baselines import (
    peft_svd,
    peft_svd_pairs,
    task_arithmetic,
    task_arithmetic_pairs,
    ties,
    ties_delta,
)
from merging.loading import load_sources
from merging.merge import add_adapter, add_pairs, merge_adapters, merge_pairs
from merging.sources import Source, SourceError

__all__ = ["MergedAdapter", "Source", "SourceError", "add_adapter", "add_pairs", "load_sources",
           "merge_adapters", "merge_pairs", "peft_svd", "peft_svd_pairs", "read_provenance",
           "save_merged", "task_arithmetic", "task_arithmetic_pairs", "ties", "ties_delta"]
