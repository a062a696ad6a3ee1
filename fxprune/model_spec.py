"""Build a model from a one-word spec, for the command line: ``torchvision:NAME``, ``timm:NAME``,
``hf:CONFIG_JSON`` or ``module.path:factory``.

Weights are never downloaded: torchvision and timm models are built with
random initialisation, Hugging Face models from their ``config.json`` alone.
Pruning decisions (which weights, which shapes) do not depend on the values;
for a real model, call the Python API on your own trained instance.
"""
from __future__ import annotations

import importlib
import json
import os

import torch
from torch import nn

__all__ = ["build_model", "example_input", "parse_shape"]


def build_model(spec: str) -> nn.Module:
    """The model a spec names, in eval mode; ``ValueError`` with the reason if it cannot be built."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"model spec {spec!r} must look like torchvision:resnet50, timm:NAME, hf:config.json "
                         "or module.path:factory")
    try:
        if kind == "torchvision":
            import torchvision

            model = torchvision.models.get_model(name, weights=None)
        elif kind == "timm":
            import timm

            model = timm.create_model(name, pretrained=False)
        elif kind == "hf":
            model = _hf_model(name)
        else:
            factory = getattr(importlib.import_module(kind), name, None)
            if factory is None or not callable(factory):
                raise ValueError(f"module {kind!r} has no callable {name!r}")
            model = factory()
    except ImportError as e:
        raise ValueError(f"cannot build {spec!r}: {e}") from None
    except (KeyError, RuntimeError) as e:  # unknown model names in torchvision/timm
        raise ValueError(f"cannot build {spec!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} gave a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _hf_model(path: str) -> nn.Module:
    import transformers

    if not os.path.isfile(path):
        raise ValueError(f"hf: expects a config.json file, {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: no 'model_type' key; is it a Hugging Face config.json?")
    config = transformers.AutoConfig.for_model(model_type, **data)
    arch = (data.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; ``ValueError`` otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(f"input shape {text!r} must be comma-separated integers such as 1,3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input shape {text!r} must be positive integers such as 1,3,224,224")
    return shape


def example_input(model: nn.Module, spec: str, shape: tuple[int, ...] | None) -> torch.Tensor:
    """A random input for ``model``: token ids for ``hf:`` models, else a float tensor of ``shape``.

    Without a shape, vision specs use the model's own input size (timm's
    ``pretrained_cfg``, 224x224 for torchvision) at batch 1, and ``hf:`` uses
    ``1, 128`` tokens; other specs need a shape.
    """
    kind = spec.partition(":")[0]
    gen = torch.Generator().manual_seed(0)
    if kind == "hf":
        vocab = int(getattr(model.config, "vocab_size", 1000))
        return torch.randint(0, vocab, shape or (1, 128), generator=gen)
    if shape is None:
        if kind == "timm":
            shape = (1, *getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        elif kind == "torchvision":
            shape = (1, 3, 224, 224)
        else:
            raise ValueError(f"{spec}: give --input-shape (e.g. 1,3,224,224); the model's input is unknown")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(shape, generator=gen).to(dtype)
