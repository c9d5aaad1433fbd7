"""`sam-jax download NAME...`: the official weights by name (vit_b, vit_l, vit_h) or a Hugging
Face id, downloaded with their SHA-256 checked, converted once and cached (sam_jax.hub); after
that `--checkpoint NAME` and `sam_jax.load(NAME)` use the cached conversion offline."""

from __future__ import annotations

import time

from .common import CliError, info


def add_parser(sub) -> None:
    from ..hub import HF_REPOS, OFFICIAL_CHECKPOINTS

    names = list(OFFICIAL_CHECKPOINTS) + list(HF_REPOS)
    down = sub.add_parser(
        "download", help="fetch, verify, convert and cache official weights by name",
        description="Download official SAM weights by name, check their SHA-256, convert them "
        "once and cache the result ($SAM_JAX_CACHE_DIR, else the per-user cache folder; "
        "$SAM_JAX_BASE_URL for a mirror). Hugging Face ids need huggingface_hub.")
    down.add_argument("names", nargs="+", metavar="NAME", choices=names,
                      help=f"one of: {', '.join(names)}")
    down.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    down.set_defaults(run=run_download)


def run_download(args) -> int:
    from ..hub import HubError, converted

    for name in args.names:
        start = time.perf_counter()
        info(args, f"{name}: fetching (a cached copy is used when present)")
        try:
            path = converted(name, progress=not args.quiet)
        except HubError as e:
            raise CliError(str(e)) from None
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s); use it as "
              f"`--checkpoint {name}` or sam_jax.load({name!r})")
    return 0
