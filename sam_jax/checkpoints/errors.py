"""The one error type of sam_jax.checkpoints, in a module of its own that imports nothing, so
that every reader, converter and writer of the package (and training's checkpointer) can raise
it without importing one another."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message names the file
    (where known) and every offending key."""
