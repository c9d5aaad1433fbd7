"""Where CPU and accelerator code paths part: one place that says which kind of device runs
the work, so the per-backend choices (encoder attention, prompt grouping, mask-generation
batching) are made consistently and each stays testable on CPU by naming it explicitly.

Choices are made at trace time from `jax.default_backend()`: a process computes on one
backend, and every choice here changes only how the work is laid out, never the result.
"""

from __future__ import annotations

from typing import Optional

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
