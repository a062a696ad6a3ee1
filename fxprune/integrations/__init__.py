"""Trainer adapters, each an optional extra imported only when asked for.

* ``fxprune.integrations.lightning.FxpruneCallback`` -- a PyTorch Lightning ``Callback``
  (needs ``lightning`` or ``pytorch_lightning``).
* ``fxprune.integrations.huggingface.FxpruneTrainerCallback`` -- a Hugging Face
  ``transformers.TrainerCallback``.

Both do the same thing: attach the trainer's optimizer(s) to the Pruner
(optimizer mode: re-masking after every step actually taken, the step clock,
optimizer-state zeroing) and feed it the trainer's epoch at each epoch start.
This package imports neither library; ``import fxprune`` never does either.
"""
__all__: list[str] = []
