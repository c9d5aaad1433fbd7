"""`sam-jax train --config CONFIG [key=value ...]`: train or fine-tune SAM (sam_jax.training).

Running the same command again in the same workdir resumes from the latest checkpoint; SIGTERM
saves the current step and exits (status 0), so a preempted job is restarted as it was.
"""

from __future__ import annotations

from .common import CliError


def add_parser(sub) -> None:
    tr = sub.add_parser(
        "train", help="train or fine-tune SAM from a config file (resumes automatically)",
        description="Train SAM with the paper's interactive simulation. CONFIG is a JSON file "
        "(see experiments/configs/); overrides set nested fields, e.g. steps=100 "
        "optim.peak_lr=1e-4 data.root=/data/davis. A workdir that has checkpoints is resumed.")
    tr.add_argument("--config", required=True, metavar="CONFIG", help="training config (JSON)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="config overrides (values parsed as JSON when possible)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(run=run_train)


def run_train(args) -> int:
    try:
        from ..training.config import load_config
        cfg = load_config(args.config, args.overrides)
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from None
    except ImportError as e:
        raise CliError(f"training needs the 'train' extra ({e}): pip install 'sam-jax[train]'")
    from ..training.train import train

    try:
        result = train(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    metrics = result["metrics"]
    if not result["finished"]:
        print(f"stopped at step {int(result['state']['step'])} (checkpoint saved); run the same "
              "command again to resume")
        return 0
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"done: {cfg.steps} steps; final metrics: {shown}")
    print(f"model: {cfg.export_dir or cfg.workdir + '/final'}")
    return 0
