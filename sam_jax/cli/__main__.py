"""`python -m sam_jax.cli ...`, the same as `python -m sam_jax ...` and `sam-jax ...`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
