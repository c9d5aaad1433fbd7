"""The SAM paper's experiments (§7, App. D) as functions: point-to-mask mIoU, zero-shot edges and
the BSDS500 boundary benchmark, object proposals, box-prompted instances, SA-1B statistics.
`sam-jax eval TASK` (sam_jax/cli/eval.py) runs each from the command line."""
