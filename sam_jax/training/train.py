"""The training loop behind `sam-jax train`: data, sharded jitted steps, checkpoints, metrics,
evaluation and the exported inference checkpoint.

A run lives in `workdir`:
  checkpoints/   Orbax steps (state + the config and metrics of that step), last `keep` kept
  metrics.jsonl  one JSON line per logged step and per evaluation
  curves.png     loss / IoU / learning-rate curves (redrawn at each evaluation and at the end)
  tfds/          the prepared dataset (unless data.data_dir says elsewhere)
  final/         the trained model as a converted checkpoint (`sam_jax.load` / `--checkpoint`)
Starting again in the same workdir resumes from the latest checkpoint: the state is restored
into the same shardings, and since batches and random keys are functions of the step number,
the resumed run computes exactly what the uninterrupted run would have. SIGTERM (a TPU
preemption notice) saves the current step and exits cleanly.

Multi-process (`distributed: true`): every process runs this same loop on one shared workdir.
Each reads only its rows of every batch; Orbax writes each process's shards of a checkpoint;
process 0 alone prepares the dataset (the others wait, then read it), writes metrics.jsonl,
curves.png and final/, and runs the evaluations. A SIGTERM to any one process stops all of them
after the same step (`PreemptionWatcher`), so their checkpoint is one consistent step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from ..build_sam import init_variables
from ..configs import Dinov2EncoderConfig
from ..inference import SamModel
from ..sharding import barrier, data_mesh, initialize_distributed
from .config import TrainConfig
from .optim import make_optimizer
from .train_step import compile_train_step, global_batch, init_state, place_state


def _prepare_data(cfg: TrainConfig):
    """Prepares the dataset (process 0 first: concurrent TFDS preparations of one directory
    would race; the others then find it prepared) and returns its train and eval sources."""
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            sources = _prepare_data_here(cfg)
        barrier("sam_jax: dataset prepared", timeout_s=24 * 3600)  # SA-1B takes hours
        if jax.process_index() == 0:
            return sources
    return _prepare_data_here(cfg)


def _prepare_data_here(cfg: TrainConfig):
    from . import datasets

    data = cfg.data
    data_dir = data.data_dir or os.path.join(cfg.workdir, "tfds")
    if not data.root:
        raise ValueError("data.root is empty: give the dataset folder (e.g. data.root=/path)")
    if data.kind == "image_mask_folder":
        builder = datasets.prepare_image_mask_folder(data.root, data_dir,
                                                     holdout_groups=data.holdout_groups)
    elif data.kind == "sa1b":
        builder = datasets.prepare_sa1b_folder(data.root, data_dir,
                                               images_dir=data.images_dir or None,
                                               validation_fraction=data.validation_fraction)
    else:
        raise ValueError(f"unknown data.kind {data.kind!r}: expected image_mask_folder or sa1b")
    train = datasets.load_source(builder, "train")
    has_eval = "validation" in builder.info.splits
    return train, (datasets.load_source(builder, "validation") if has_eval else None)


def _keep_refiner(cfg: TrainConfig, config) -> TrainConfig:
    """A starting checkpoint with a mask refiner or an edge stage (the bundled model) keeps
    them, frozen: the training loss never reads them (they shape the masks users see, not the
    decoder's), and the exported model should show refined masks as the checkpoint did."""
    for field in ("mask_refiner", "edge_refiner"):
        if getattr(config, field) is None or getattr(cfg.model, field) is not None:
            continue
        print(f"{cfg.init_from}: keeping its {field.replace('_', ' ')}, frozen", flush=True)
        cfg = dataclasses.replace(
            cfg, model=cfg.model.replace(**{field: getattr(config, field)}),
            optim=dataclasses.replace(cfg.optim, freeze=tuple(cfg.optim.freeze) + (field,)))
    return cfg


def _keep_input_size(cfg: TrainConfig, config) -> TrainConfig:
    """A starting DINOv2 checkpoint trained at another input size than the configured model's
    (the bundled model runs at 518 px, the `dinov2_s` preset at 448) keeps its size: its
    weights fit either, but its head was trained at its own grid, and fine-tuning at another
    would silently change what users of the result get."""
    ours, theirs = cfg.model.image_encoder, config.image_encoder
    if not (isinstance(ours, Dinov2EncoderConfig) and isinstance(theirs, Dinov2EncoderConfig)
            and ours.img_size != theirs.img_size):
        return cfg
    print(f"{cfg.init_from}: training at its input size, {theirs.img_size} px "
          f"(the configured model's is {ours.img_size})", flush=True)
    return dataclasses.replace(cfg, model=cfg.model.replace(
        image_encoder=dataclasses.replace(ours, img_size=theirs.img_size)))


def _initial_variables(cfg: TrainConfig):
    """(cfg, variables): the starting variables, and the config to train them with (a
    refiner of the starting checkpoint is kept: `_keep_refiner`; so is a DINOv2 checkpoint's
    input size: `_keep_input_size`)."""
    if cfg.init_from:
        from ..checkpoints import load_variables

        config, variables = load_variables(cfg.init_from, config=None)
        cfg = _keep_input_size(_keep_refiner(cfg, config), config)
        if jax.tree.map(np.shape, variables["params"]) != jax.tree.map(
                np.shape, jax.eval_shape(lambda: init_variables(cfg.model, jax.random.key(0)))
                ["params"]):
            raise ValueError(f"{cfg.init_from}: its parameters do not match the configured "
                             "model; set model to the checkpoint's type")
        return cfg, variables
    return cfg, init_variables(cfg.model, jax.random.key(cfg.step.seed))


def _to_host(tree):
    """Device arrays -> numpy. Multi-process, an array split across hosts (FSDP) is gathered
    first, one leaf at a time (a whole-state gather could exhaust device memory): a
    collective, so every process must call this at the same point with the same tree.
    Replicated leaves are read from a local copy (no collective, nothing to compile)."""
    from jax.experimental import multihost_utils

    def get(leaf):
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable
                                                or leaf.is_fully_replicated):
            return multihost_utils.process_allgather(leaf, tiled=True)
        return jax.device_get(leaf)

    return jax.tree.map(get, tree)


class MetricsLog:
    """Appends JSON lines; on resume, drops lines past the restored step (they will be redone).
    With `write=False` (processes other than 0 of a multi-process run, which share the file)
    it neither rewrites nor appends."""

    def __init__(self, path: str, resume_step: int, write: bool = True):
        self.path = path
        self.enabled = write
        if not write:
            return
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def _plot(log: MetricsLog, cfg: TrainConfig) -> None:
    """Redraws curves.png, where the log is written (process 0)."""
    if log.enabled:
        plot_curves(log.records(), os.path.join(cfg.workdir, "curves.png"))


def plot_curves(records: list[dict[str, Any]], path: str) -> None:
    # A bare Figure, not pyplot: switching pyplot's backend here would silence the plots of
    # a notebook that trains and then draws.
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label="loss")
        axes[0].set_yscale("log")
        axes[1].plot(steps, [r["iou_first_round"] for r in train], label="train IoU, round 1")
        axes[1].plot(steps, [r["iou_last_round"] for r in train], label="train IoU, round 11")
        axes[2].plot(steps, [r["learning_rate"] for r in train])
    for key in ("miou_1", "miou_3", "oracle_1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            axes[1].plot(*zip(*pts), "o-", label=f"held-out {key}")
    axes[0].set_title("training loss")
    axes[1].set_title("IoU")
    axes[1].legend(fontsize=8)
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _evaluate(cfg: TrainConfig, params, buffers, source, step: int) -> dict[str, Any] | None:
    """Held-out click mIoU on process 0 (None elsewhere; all processes must call it, for the
    gather of the parameters)."""
    from .data import eval_examples
    from .evaluate import evaluate_clicks

    variables = _to_host({"params": params, "buffers": buffers})
    if jax.process_index() != 0:
        return None
    model = SamModel(cfg.model, variables)
    examples = eval_examples(source, max_examples=cfg.eval_images)
    result = evaluate_clicks(model, examples, num_clicks=cfg.eval_clicks)
    return {"kind": "eval", "step": step, **result}


def _compiled_together(step_fn, args, step: int):
    """`step_fn` compiled ahead for `args`; multi-process, returns once every process has it,
    so that they enter the first step's collectives together (compile times differ between
    processes, e.g. when one finds the step in the compilation cache; see `barrier`)."""
    if jax.process_count() == 1:
        return step_fn
    compiled = step_fn.lower(*args).compile()
    barrier(f"sam_jax: train step compiled at step {step}", timeout_s=3600)
    return compiled


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Runs (or resumes) the configured training. `stop_after` ends the process's work after
    that many steps of this call (tests use it to simulate an interrupted run). Returns the
    final state (host arrays) and the last metrics."""
    from .checkpointing import PreemptionWatcher, TrainCheckpointer
    from .data import TrainLoader

    if cfg.distributed:
        initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    if cfg.batch_size % jax.device_count():
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {jax.device_count()} "
                         "devices (each device takes an equal share of the images)")
    os.makedirs(cfg.workdir, exist_ok=True)
    train_source, eval_source = _prepare_data(cfg)
    mesh = data_mesh()
    cfg, variables = _initial_variables(cfg)
    params, buffers = variables["params"], variables["buffers"]
    optimizer = make_optimizer(cfg.optim, params)
    shapes = jax.eval_shape(lambda p, b: (p, b), params, buffers)
    compiled = compile_train_step(cfg.model, cfg.optim, cfg.step, shapes[0], shapes[1], mesh,
                                  fsdp=cfg.fsdp, optimizer=optimizer)
    buffers = jax.device_put(buffers, compiled.buffers_sharding)

    ckpt = TrainCheckpointer(os.path.join(os.path.abspath(cfg.workdir), "checkpoints"),
                             save_every=cfg.save_every, keep=cfg.keep)
    start = ckpt.latest_step()
    if start is None:
        state = place_state(params, optimizer, compiled.state_sharding)
        start = 0
    else:
        abstract = jax.eval_shape(lambda p: init_state(p, optimizer), params)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, compiled.state_sharding)
        state = ckpt.restore(abstract, start)
    del params
    log = MetricsLog(os.path.join(cfg.workdir, "metrics.jsonl"), start,
                     write=jax.process_index() == 0)
    loader = TrainLoader(train_source, cfg.batch_size, image_size=cfg.model.image_size,
                         max_masks=cfg.data.max_masks, seed=cfg.step.seed,
                         num_workers=cfg.data.num_workers,
                         worker_count=cfg.data.worker_count,
                         low_res_size=cfg.model.low_res_size)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step")
    metrics: dict[str, Any] = {}
    config_dict = cfg.to_dict()  # saved beside every checkpoint
    step = start
    t0 = time.time()
    with PreemptionWatcher() as watcher:
        batches = loader.batches(start, end - start)
        step_fn = None
        try:
            for step, local in batches:
                batch = global_batch(local, mesh)
                if step_fn is None:
                    step_fn = _compiled_together(compiled.step, (state, batch, buffers), step)
                state, metrics = step_fn(state, batch, buffers)
                done = step + 1
                if done % cfg.log_every == 0 or done == end:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    rate = (done - start) / max(time.time() - t0, 1e-9)
                    log.write({"kind": "train", "step": done, "steps_per_s": rate, **metrics})
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                        iou=f"{metrics['iou_last_round']:.3f}")
                if bar is not None:
                    bar.update(1)
                if watcher.should_stop(done):
                    ckpt.maybe_save(done, state, force=True, extra={"config": config_dict})
                    break
                ckpt.maybe_save(done, state, extra={"config": config_dict, "metrics": metrics})
                if (cfg.eval_every and done % cfg.eval_every == 0 and eval_source is not None
                        and done != cfg.steps):
                    log.write(_evaluate(cfg, state["params"], buffers, eval_source, done))
                    _plot(log, cfg)
        finally:
            batches.close()
            loader.close()
            ckpt.wait()
    if bar is not None:
        bar.close()
    finished = int(jax.device_get(state["step"])) >= cfg.steps
    if finished:
        ckpt.maybe_save(cfg.steps, state, force=True, extra={"config": config_dict})
        ckpt.wait()
        if eval_source is not None:
            result = _evaluate(cfg, state["params"], buffers, eval_source, cfg.steps)
            if result is not None:
                log.write(result)
                metrics = dict(metrics, **{f"eval_{k}": v for k, v in result.items()
                                           if k not in ("kind", "step")})
        export_inference(cfg, state["params"], buffers)
        _plot(log, cfg)
    ckpt.close()
    return {"state": _to_host(state), "metrics": metrics, "finished": finished}


def export_inference(cfg: TrainConfig, params, buffers) -> str:
    """Writes the trained variables as a converted checkpoint (`sam_jax.load` reads it).
    Multi-process: every process calls it (the parameters are gathered), process 0 writes."""
    from ..checkpoints import save_converted

    out = cfg.export_dir or os.path.join(cfg.workdir, "final")
    # training-only switches off: the exported config equals the inference preset
    encoder = dataclasses.replace(cfg.model.image_encoder, drop_path_rate=0.0, remat_blocks=False)
    model = cfg.model.replace(image_encoder=encoder)
    variables = _to_host({"params": params, "buffers": buffers})
    if jax.process_index() == 0:
        save_converted(variables, model, out, overwrite=True,
                       metadata={"source": f"trained by sam-jax train in {cfg.workdir}"})
    return out
