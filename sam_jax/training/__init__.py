"""Training SAM (no counterpart in the official release): losses, the paper's interactive
prompt simulation, a sharded jitted train step, data pipelines and preemption-safe checkpoints."""
