"""Reads a `.safetensors` file (Hugging Face's format) into numpy arrays, bfloat16 included.

The `safetensors` library reads it when it can; it refuses files holding bfloat16 (numpy has no
such dtype), and those are parsed here into `ml_dtypes.bfloat16` arrays. Nothing in the format
can run code. (The module is not named `safetensors.py` so that it never stands in for the
library.)
"""

from __future__ import annotations

import json
from typing import Dict

import ml_dtypes
import numpy as np

from .errors import CheckpointError

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_safetensors(path: str) -> Dict[str, np.ndarray]:
    """The tensors of the file by name, as numpy arrays of their stored dtype."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except TypeError:  # numpy has no bfloat16; the library refuses such files: parse them here
        pass
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})")
    # Layout: u64 little-endian header length, JSON header {name: {dtype, shape,
    # data_offsets}}, then the tensor bytes. The library has already validated the header.
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data = f.read()
    header.pop("__metadata__", None)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[key] = np.frombuffer(data[begin:end], _SAFETENSORS_DTYPES[info["dtype"]]).reshape(
            info["shape"])
    return out
