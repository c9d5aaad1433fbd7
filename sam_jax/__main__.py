"""`python -m sam_jax ...` is the `sam-jax` command line (see sam_jax/cli/)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
