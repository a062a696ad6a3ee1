"""Reading a safetensors file as views of one copy-on-write memory mapping of it.

The loaders of compact checkpoints read many small parts (resnet50's file has
700: values, bitmasks, CSR indices, BatchNorm vectors). ``safetensors.torch.load_file``
builds each through torch storage slicing in Python, about 25 µs a tensor:
19 ms for resnet50, more than decoding them. Here safetensors' own
``safe_open`` checks the file (header, offsets, sizes) and gives its metadata,
then every tensor is a view of one private mapping of the file (a few µs),
whose pages are read on first touch; writing a returned tensor never changes
the file. A file holding a dtype outside the table below is read by
``load_file`` instead.
"""
from __future__ import annotations

import json
import mmap
import struct

import torch

from fxprune.checkpoints.extras import require

__all__ = ["read_safetensors"]

# safetensors' dtype names and torch's dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, {key: tensor})`` of the safetensors file at ``path``, checked by safetensors first."""
    with require("safetensors").safe_open(path, framework="pt"):
        pass  # opening checks the header, the offsets and the sizes; the header is read once more below
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        if any(info["dtype"] not in _SAFETENSORS_DTYPES for info in header.values()):
            return metadata, require("safetensors.torch").load_file(path)
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + length
    if len(mapping) > start:
        data = torch.frombuffer(mapping, dtype=torch.uint8, offset=start)
    else:  # no tensor data: frombuffer refuses an empty buffer
        data = torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        raw, dtype = data[begin:end], _SAFETENSORS_DTYPES[info["dtype"]]
        if begin % dtype.itemsize:
            raw = raw.clone()  # not aligned to its element size: a view would be refused
        tensors[key] = raw.view(dtype).view(info["shape"])
    return metadata, tensors
