"""Training run configuration: one JSON file (experiments/configs/*.json) plus `key=value`
overrides from the command line.

The file names presets and overrides them field by field:
    {"model": {"preset": "mini", "image_encoder": {"drop_path_rate": 0.1}},
     "optim": {"preset": "vit_b", "peak_lr": 4e-4},
     "data": {"kind": "image_mask_folder", "root": "...", "holdout_groups": ["dog"]},
     "batch_size": 8, "steps": 3000, "workdir": "runs/x", ...}
An override `optim.peak_lr=1e-3` or `model.image_encoder.depth=2` sets one nested field; its
value is parsed as JSON when it can be (numbers, booleans, lists) and kept as a string otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from ..configs import SamConfig, get_config
from .optim import PRESETS, OptimConfig
from .train_step import StepConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: str = "image_mask_folder"  # or "sa1b"
    root: str = ""  # the raw folder (DAVIS-style root; SA-1B folder, tars or generate output)
    images_dir: str = ""  # sa1b from `sam-jax generate`: where the images are
    data_dir: str = ""  # where TFDS prepares the dataset (default: <workdir>/tfds)
    holdout_groups: tuple[str, ...] = ()  # image_mask_folder: whole groups kept for evaluation
    validation_fraction: float = 0.0  # sa1b: fraction of images kept for evaluation
    max_masks: int = 64  # masks per image per step (the paper's 64)
    num_workers: int = 2  # reader threads in each loader process
    worker_count: int | None = None  # Grain worker processes (None: cores - 1; 0: none)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: SamConfig
    optim: OptimConfig
    data: DataConfig
    step: StepConfig = StepConfig()
    workdir: str = "runs/default"
    batch_size: int = 8  # global batch, in images
    steps: int = 1000
    save_every: int = 200
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_images: int = 50  # images of the held-out split per evaluation
    eval_clicks: int = 3
    fsdp: bool = False
    init_from: str = ""  # a converted checkpoint, .pth or safetensors to start from
    # multi-process: `distributed` calls jax.distributed.initialize() with the three settings
    # below; the defaults ("" / 0 / -1) leave them to JAX's cluster detection (TPU pods, Slurm,
    # Open MPI, JAX_COORDINATOR_ADDRESS). Elsewhere give each process all three, e.g.
    # `distributed=true coordinator_address=10.0.0.1:1234 num_processes=2 process_id=1`.
    distributed: bool = False
    coordinator_address: str = ""  # host:port of process 0's coordinator
    num_processes: int = 0
    process_id: int = -1
    export_dir: str = ""  # where the final inference checkpoint goes (default <workdir>/final)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if isinstance(child, str):  # a preset name becomes {"preset": name} to take fields
            child = {"preset": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
        node[k] = child
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _replace_known(obj, fields: dict, where: str):
    known = {f.name for f in dataclasses.fields(obj)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"unknown {where} fields: {sorted(unknown)}; known: {sorted(known)}")
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return dataclasses.replace(obj, **fixed)


def _model_config(spec: Any) -> SamConfig:
    if isinstance(spec, str):
        return get_config(spec)
    spec = dict(spec)
    base = get_config(spec.pop("preset", "vit_b")).to_dict()
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    return SamConfig.from_dict(base)


def _optim_config(spec: Any) -> OptimConfig:
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = dict(spec)
    name = spec.pop("preset", None)
    if name is None:
        return OptimConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in spec.items()})
    if name not in PRESETS:
        raise ValueError(f"unknown optim preset {name!r}; expected one of {sorted(PRESETS)}")
    return _replace_known(PRESETS[name], spec, "optim")


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    raw = {k: v for k, v in copy.deepcopy(raw).items() if not k.startswith("_")}  # comments
    for key in ("model", "optim", "data"):
        if key not in raw:
            raise ValueError(f"training config needs a {key!r} section")
    model = _model_config(raw.pop("model"))
    optim = _optim_config(raw.pop("optim"))
    data = _replace_known(DataConfig(), raw.pop("data"), "data")
    step = _replace_known(StepConfig(), raw.pop("step", {}), "step")
    if optim.drop_path and not model.image_encoder.drop_path_rate:
        # the optimizer preset carries the paper's drop path; the encoder is where it acts
        encoder = dataclasses.replace(model.image_encoder, drop_path_rate=optim.drop_path)
        model = model.replace(image_encoder=encoder)
    base = TrainConfig(model=model, optim=optim, data=data, step=step)
    return _replace_known(base, raw, "training config")


def load_config(path: str | os.PathLike,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read training config ({e})") from None
    for text in overrides:
        key, value = parse_override(text)
        _set(raw, key, value)
    return from_dict(raw)
