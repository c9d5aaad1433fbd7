"""Where CPU and accelerator code paths part: one place that says which kind of device runs
the work, so the per-backend choices (encoder attention, prompt grouping, mask-generation
batching) are made consistently and each stays testable on CPU by naming it explicitly.

Choices are made at trace time from `jax.default_backend()`: a process computes on one
backend, and every choice here changes only how the work is laid out, never the result.
"""

from __future__ import annotations

from typing import Optional, Union

import jax

# Prompts decoded together inside one call on a CPU: the per-prompt feature maps of a group
# stay cache- and heap-sized. Accelerators decode every prompt at once.
CPU_DECODE_GROUP_SIZE = 8


def on_accelerator(backend: Optional[str] = None) -> bool:
    """True for GPU/TPU (anything but the host CPU)."""
    return (backend or jax.default_backend()) != "cpu"


def decode_group_size(configured: Optional[int], backend: Optional[str] = None) -> int:
    """Prompts per group in `inference.decode_prompts`: the configured value when set (0 = all
    at once), else 8 on CPU and all at once on accelerators, where a sequential loop over
    groups would leave the device idle."""
    if configured is not None:
        return int(configured)
    return 0 if on_accelerator(backend) else CPU_DECODE_GROUP_SIZE


# torch's device types (what official SAM code passes to `sam.to(...)`) -> JAX platforms;
# "gpu" covers CUDA and ROCm in JAX, as "cuda" does in torch.
TORCH_DEVICE_TYPES = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "tpu": "tpu"}
_TORCH_NAMES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def find_device(device: Union[str, jax.Device, object]) -> Optional[jax.Device]:
    """The JAX device for a torch-style name ("cpu", "cuda", "cuda:1", or a `torch.device`,
    read through `str()` so torch is never imported) or a `jax.Device` (returned as is).
    None when this process has no device of that kind (e.g. "cuda" on a CPU-only JAX).
    Raises ValueError for an unknown kind or an index past the devices of that kind."""
    if isinstance(device, jax.Device):
        return device
    text = str(device)
    kind, _, index = text.partition(":")
    if kind not in TORCH_DEVICE_TYPES or (index and not index.isdigit()):
        raise ValueError(f"unknown device {text!r}: expected one of "
                         f"{sorted(TORCH_DEVICE_TYPES)}, optionally with an index "
                         "(\"cuda:1\"), or a jax.Device")
    try:
        devices = jax.devices(TORCH_DEVICE_TYPES[kind])
    except RuntimeError:  # JAX raises when no backend of that platform is present
        return None
    if int(index or 0) >= len(devices):
        raise ValueError(f"device {text!r}: this process has {len(devices)} "
                         f"{TORCH_DEVICE_TYPES[kind]} device(s): {devices}")
    return devices[int(index or 0)]


def torch_style_name(devices) -> str:
    """The torch-style name of where an array lives ("cpu", "cuda:0"; "cuda" for several GPUs),
    so official code such as `torch.tensor(..., device=predictor.device)` can use it."""
    devices = list(devices)
    name = _TORCH_NAMES.get(devices[0].platform, devices[0].platform)
    if name == "cpu" or len(devices) > 1:  # torch has one "cpu" device
        return name
    return f"{name}:{devices[0].id}"
