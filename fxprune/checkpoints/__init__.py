"""Compact checkpoints of pruned models: one save/load pair per audience, one sparse codec underneath.

* :func:`save_pretrained` / :func:`load_pretrained`: what people deploy. A
  transformers model becomes a Hugging Face folder in compressed-tensors'
  ``sparse-bitmask`` or ``sparse-24-bitmask`` format (picked from the weights);
  any other model one safetensors file in the same bitmask layout.
* :func:`save_sparse` / :func:`load_sparse` / :func:`load_sparse_state_dict`:
  any model's whole ``state_dict`` in one file, each tensor dense, bitmask or
  CSR, whichever is smallest.

Layout of this package: ``codec`` (the tensor encodings, torch and numpy),
``sparse_file`` (the single-file format), ``in_place`` (which entries a loader
may decode straight into a model's parameters), ``huggingface`` (the folder
format and compressed-tensors' part in it), ``extras`` (lazy imports of the
``compressed`` extra).
"""
from fxprune.checkpoints.huggingface import SavedCheckpoint, load_pretrained, save_pretrained
from fxprune.checkpoints.sparse_file import load_sparse, load_sparse_state_dict, save_sparse

__all__ = ["save_pretrained", "load_pretrained", "save_sparse", "load_sparse", "load_sparse_state_dict", "SavedCheckpoint"]
