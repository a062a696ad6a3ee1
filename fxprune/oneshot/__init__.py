"""One-shot pruning of large models from a few calibration batches (SparseGPT, Wanda, magnitude)."""
