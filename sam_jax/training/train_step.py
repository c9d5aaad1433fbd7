"""One pure, jitted train step on a device `Mesh`, and the state it updates.

The state is a dict `{"step", "params", "opt_state"}` (a plain pytree, so Orbax saves and
restores it into any sharding). The prompt encoder's Fourier matrix ("buffers") is not trained
and travels beside the state, replicated. Randomness (drop path, prompt sampling) comes from
`fold_in(key(seed), step)`, so a step's result depends only on the state and its batch: a
resumed run repeats exactly what an uninterrupted one does.

Sharding: the batch is split over the mesh's `data` axis; parameters and optimizer state are
replicated, or, with `fsdp=True`, each array of at least `FSDP_MIN_SIZE` elements is split over
`data` along its largest divisible axis (XLA gathers it where it is used). The state is donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..configs import SamConfig
from ..modeling import PAD_LABEL, Sam
from ..utils.transforms import normalize_padded
from .optim import OptimConfig, learning_rate_schedule, make_optimizer
from .simulation import simulate

FSDP_MIN_SIZE = 2 ** 14
BATCH_KEYS = ("image", "input_size", "masks", "boxes", "mask_valid")
# A frozen-backbone batch carries the backbone's cached features instead of the image.
FEATURE_BATCH_KEYS = ("features", "input_size", "masks", "boxes", "mask_valid")
# Optional: (B, L, L) bool, the view's cells outside every annotated mask, where background
# clicks may land (`StepConfig.background_click_prob`).
BACKGROUND_KEY = "background"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step needs besides the model config and the optimizer."""

    seed: int = 0
    remat_rounds: bool = True  # recompute each decoder round in the backward pass
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    supervise_all_iou: bool = True
    # Corrective clicks per simulated interaction: the paper's 8 (11 decoder rounds in all);
    # fewer spends a small compute budget on more masks.
    click_rounds: int = 8
    # Share of corrective clicks at the error region's interior (where the evaluation clicks)
    # rather than uniform over it (the paper's rule: 0).
    center_click_prob: float = 0.0
    # Share of corrective clicks that are negative clicks on the background near the object
    # (`simulation.add_click`; 0 in the paper).
    background_click_prob: float = 0.0


def loss_and_metrics(params, buffers, batch, key, *, model_config: SamConfig,
                     step_config: StepConfig, train_encoder: bool = True):
    """The step's loss: encode each image once, then the interactive simulation for every mask.

    batch: image (B, S, S, 3) uint8 (or, for a frozen pretrained backbone, its cached
    `features` (B, g, g, C), of which only the neck is applied), input_size (B, 2),
    masks (B, N, L, L) bool with L = `model_config.low_res_size`, boxes (B, N, 4),
    mask_valid (B, N)."""
    model = Sam(model_config)
    variables = {"params": params, "buffers": buffers}
    k_drop, k_sim = jax.random.split(key)
    if "features" in batch:
        embeddings = model.apply(variables, batch["features"], method="embed_features")
    else:
        # the loader's uint8 images (resize_and_pad), normalized here as inference does
        pixels = normalize_padded(batch["image"], batch["input_size"], model_config.pixel_mean,
                                  model_config.pixel_std)
        embeddings = model.apply(variables, pixels, not train_encoder, method="embed_image",
                                 rngs={"dropout": k_drop})
        if not train_encoder:
            embeddings = jax.lax.stop_gradient(embeddings)
    b, n = batch["mask_valid"].shape
    image = jnp.repeat(embeddings, n, axis=0)  # prompt i reads image i // n
    flat = lambda x: x.reshape((b * n,) + x.shape[2:])  # noqa: E731

    def decode(coords, labels, mask_logits):
        sparse = model.apply(variables, coords, labels, method="encode_tokens")
        if mask_logits is None:
            dense = model.apply(variables, 1, method="no_mask_dense")
        else:
            dense = model.apply(variables, mask_logits[..., None], method="encode_masks")
        return model.apply(variables, image, sparse, dense, labels != PAD_LABEL,
                           method="decode_all")

    loss_kwargs = dict(focal_weight=step_config.focal_weight,
                       dice_weight=step_config.dice_weight, iou_weight=step_config.iou_weight,
                       supervise_all_iou=step_config.supervise_all_iou)
    background = batch.get(BACKGROUND_KEY)
    if background is not None:
        background = jnp.repeat(background, n, axis=0)
    out = simulate(decode, k_sim, flat(batch["masks"]), flat(batch["boxes"]),
                   flat(batch["mask_valid"]), jnp.repeat(batch["input_size"], n, axis=0),
                   remat_rounds=step_config.remat_rounds, loss_kwargs=loss_kwargs,
                   cell=model_config.low_res_stride, click_rounds=step_config.click_rounds,
                   center_prob=step_config.center_click_prob,
                   background_prob=step_config.background_click_prob, background=background)
    return out.loss, out.metrics


def trains_image_encoder(optim_config: OptimConfig) -> bool:
    return not any(p == "image_encoder" or p.startswith("image_encoder/")
                   for p in optim_config.freeze)


def make_train_step(model_config: SamConfig, optim_config: OptimConfig,
                    step_config: StepConfig, optimizer: optax.GradientTransformation):
    """The pure step `(state, batch, buffers) -> (state, metrics)` (not yet jitted)."""
    schedule = learning_rate_schedule(optim_config)
    train_encoder = trains_image_encoder(optim_config)

    def train_step(state, batch, buffers):
        key = jax.random.fold_in(jax.random.key(step_config.seed), state["step"])
        grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], buffers, batch, key,
                                         model_config=model_config, step_config=step_config,
                                         train_encoder=train_encoder)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       learning_rate=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def init_state(params, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params)}


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
    """Split the largest axis that the device count divides; small arrays stay replicated."""
    if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE or num_devices == 1:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            return P(*([None] * axis + ["data"]))
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool) -> Any:
    n = mesh.shape["data"]

    def sharding(leaf):
        spec = fsdp_spec(tuple(leaf.shape), n) if fsdp else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, abstract_state)


def batch_shardings(mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS) -> dict:
    return {k: NamedSharding(mesh, P("data")) for k in keys}


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This host's rows -> one global array per key, split over `data` (multi-host safe)."""
    keys = FEATURE_BATCH_KEYS if "features" in local_batch else BATCH_KEYS
    shardings = batch_shardings(mesh, keys)
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local_batch[k]))
            for k in keys}


@dataclasses.dataclass
class CompiledStep:
    """A jitted step with its shardings: `step(state, batch, buffers)`."""

    step: Callable
    state_sharding: Any
    buffers_sharding: Any
    mesh: Mesh


def compile_train_step(model_config: SamConfig, optim_config: OptimConfig,
                       step_config: StepConfig, params_shape: Any, buffers_shape: Any,
                       mesh: Mesh, *, fsdp: bool = False,
                       optimizer: optax.GradientTransformation | None = None,
                       batch_keys: tuple[str, ...] = BATCH_KEYS) -> CompiledStep:
    """jit with in/out shardings on `mesh`, the state donated."""
    optimizer = optimizer or make_optimizer(optim_config, params_shape)
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), params_shape)
    state_sh = state_shardings(abstract, mesh, fsdp)
    buffers_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), buffers_shape)
    replicated = NamedSharding(mesh, P())
    fn = make_train_step(model_config, optim_config, step_config, optimizer)
    step = jax.jit(fn, in_shardings=(state_sh, batch_shardings(mesh, batch_keys), buffers_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
    return CompiledStep(step, state_sh, buffers_sh, mesh)


def place_state(params, optimizer: optax.GradientTransformation, state_sharding) -> dict:
    """A fresh state (step 0) created directly in its shardings."""
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_sharding)(params)
