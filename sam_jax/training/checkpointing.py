"""Training checkpoints and preemption handling (no counterpart in the official release, which
ships no training code).

`TrainCheckpointer` is a thin layer over `orbax.checkpoint.CheckpointManager`. Each step is a
directory `<directory>/<step>/` holding two Orbax items:
  state/   the train state pytree (params, optimizer state, step counter), `StandardSave`
  extra/   a small JSON dict (training config, metrics of that step), `JsonSave`
Saves are asynchronous: `maybe_save` returns once the arrays are copied off the devices and the
write goes on in a background thread; `wait()` blocks until it is on disk.

Crash safety is Orbax's commit protocol: a step is written under `<step>.orbax-checkpoint-tmp*`
and renamed to `<step>` only after every item has finished (on a POSIX file system; on object
stores such as GCS, where rename is not atomic, a `commit_success.txt` marks the finished step
instead). Orbax never lists a temporary directory as a step, so a save cut short by SIGKILL
leaves at most an ignored temporary directory, which the next `TrainCheckpointer` on that
directory deletes (`cleanup_tmp_directories`). The last *committed* step is restored.

`PreemptionWatcher` turns SIGTERM (the preemption notice on TPU VMs and most schedulers) into a
flag the train loop polls, agreed across hosts on multi-host runs (see its docstring).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..checkpoints import CheckpointError

__all__ = ["CheckpointError", "PreemptionWatcher", "TrainCheckpointer"]

PyTree = Any
_STATE, _EXTRA = "state", "extra"


# ------------------------------------------------------------------------------------- helpers
def _key_name(key) -> str:
    """One path entry as a plain string, so that a namedtuple field (`GetAttrKey`) and the dict
    key Orbax's metadata uses for it (`DictKey`) compare equal."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """'a/b/0/c' -> shape for every leaf (None and empty nodes have no leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): _shape(leaf) for path, leaf in leaves}


def _shape(leaf) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def _replicated() -> jax.sharding.Sharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("_all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _as_abstract(leaf, default_sharding) -> jax.ShapeDtypeStruct:
    """A restore target leaf: shape, dtype and sharding (replicated over all devices when the
    leaf has none, e.g. a bare `jax.eval_shape` result)."""
    sharding = getattr(leaf, "sharding", None) or default_sharding
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(_shape(leaf), dtype, sharding=sharding)


def _jsonable(obj):
    """Converts numpy / jax scalars and arrays (e.g. metrics) to plain Python for JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return np.asarray(obj).tolist()
    return obj


# ---------------------------------------------------------------------------- TrainCheckpointer
class TrainCheckpointer:
    """Periodic, asynchronous, keep-last-N checkpoints of a training run.

    Typical loop::

        with TrainCheckpointer(workdir, save_every=1000) as ckpt:
            if ckpt.latest_step() is not None:
                state = ckpt.restore(abstract_state)      # eval_shape tree + shardings
            for step in range(start, num_steps):
                state, metrics = train_step(state, batch)
                ckpt.maybe_save(step, state, extra={"config": cfg, "metrics": metrics})
        # leaving the block waits for the last write

    All hosts of a multi-host run must call `maybe_save`/`restore` with the same arguments
    (Orbax coordinates the write; each host writes its own shards, the primary host the JSON).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.keep = int(keep)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=1,  # the decision is ours (maybe_save); orbax saves when asked
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # remove half-written steps of a killed run
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _EXTRA: ocp.JsonCheckpointHandler()})
        self._started: set[int] = set()  # steps this process began saving (maybe not committed)
        self._closed = False

    # -- saving
    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `maybe_save(step, ..., force=force)` would write (not already saved)."""
        if not (force or step % self.save_every == 0):
            return False
        return step not in self._started and step not in self._manager.all_steps()

    def maybe_save(self, step: int, state: PyTree, *, force: bool = False,
                   extra: Mapping[str, Any] | None = None) -> bool:
        """Saves `state` (and the JSON dict `extra`) as step `step` when `step` is a multiple of
        `save_every` or `force` is set, unless that step is already saved. Returns whether a
        save was started. Asynchronous: the arrays are copied to host memory before this
        returns (so `state` may be donated to the next step), the files are written in the
        background. Older steps beyond the last `keep` are deleted once this one commits."""
        self._check_open()
        step = int(step)
        if not self.should_save(step, force=force):
            return False
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _EXTRA: ocp.args.JsonSave(_jsonable(dict(extra or {}))),
        })
        saved = bool(self._manager.save(step, args=args, force=True))
        if saved:
            self._started.add(step)
        return saved

    def wait(self) -> None:
        """Blocks until every started save is committed (or raises its error)."""
        self._manager.wait_until_finished()

    # -- querying
    def all_steps(self) -> list[int]:
        """Committed steps on disk, ascending (unfinished saves are never listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        return self._manager.latest_step()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no committed checkpoint to restore")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"{self.directory}: no committed checkpoint for step {step} "
                                  f"(have {steps})")
        return int(step)

    # -- restoring
    def restore(self, abstract_state: PyTree, step: int | None = None) -> PyTree:
        """Restores step `step` (default: the latest) into the structure, shapes, dtypes and
        shardings of `abstract_state`: a tree of `jax.ShapeDtypeStruct` (or arrays) as from
        `jax.eval_shape`, with `.sharding` set where a layout is wanted (leaves without one come
        back replicated over all devices). Saved values are cast to the requested dtypes.

        Raises CheckpointError naming every missing, unexpected or mis-shaped leaf when the
        saved tree does not match `abstract_state`."""
        self._check_open()
        step = self._resolve_step(step)
        default = None
        if any(getattr(leaf, "sharding", None) is None
               for leaf in jax.tree_util.tree_leaves(abstract_state)):
            default = _replicated()
        target = jax.tree.map(lambda leaf: _as_abstract(leaf, default), abstract_state)
        self._check_matches(step, target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
        return restored[_STATE]

    def _check_matches(self, step: int, target: PyTree) -> None:
        try:
            saved = self._manager.item_metadata(step)[_STATE]
        except (KeyError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.directory}/{step}: unreadable train state ({e})")
        saved = getattr(saved, "tree", saved)
        want, got = _flat_shapes(target), _flat_shapes(saved)
        problems = ([f"missing from checkpoint: {k}" for k in want if k not in got]
                    + [f"in checkpoint but not in abstract_state: {k}"
                       for k in got if k not in want]
                    + [f"{k}: abstract_state has shape {want[k]}, checkpoint has {got[k]}"
                       for k in want if k in got and want[k] != got[k]])
        if problems:
            raise CheckpointError(
                f"{self.directory}/{step}: saved train state does not match abstract_state "
                f"({len(problems)} problem(s)):\n  " + "\n  ".join(sorted(problems)))

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON dict saved with step `step` (default: the latest)."""
        self._check_open()
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
        return dict(restored[_EXTRA] or {})

    # -- lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("TrainCheckpointer is closed")

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._manager.wait_until_finished()
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- PreemptionWatcher
def _preemption_service_on() -> bool:
    """Whether `jax.distributed.initialize` started JAX's preemption sync manager (it does
    unless `jax_enable_preemption_service` is off, on any backend; CPU processes included).
    Reads a private attribute: absent -> False."""
    try:
        from jax._src import distributed
        return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return False


class PreemptionWatcher:
    """Turns a preemption notice (SIGTERM by default) into a flag polled by the train loop::

        watcher = PreemptionWatcher()
        for step in ...:
            state = train_step(state, batch)
            if watcher.should_stop(step):
                ckpt.maybe_save(step, state, force=True); ckpt.wait(); break
        watcher.close()

    The signal handler only sets a flag (no I/O, no exceptions in the interrupted code); the
    process is not terminated. `close()` puts back the handlers that were there before.

    Multi-host (`jax.process_count() > 1`) hosts must stop at the same step, or their saves
    would differ. `should_stop` must then be called by every host at every step, with the same
    step numbers. Two ways to agree, chosen by `sync`:
      "preemption_service": `jax.experimental.multihost_utils.reached_preemption_sync_point`,
          JAX's own protocol (needs `jax.distributed.initialize` with its preemption service,
          the default). JAX's coordination service catches SIGTERM itself (tested with 2 CPU
          processes: tests/test_training_multihost.py), so in this mode no Python handler is
          installed (one would replace JAX's).
      "allgather": every `check_every` steps, the hosts' flags are all-gathered
          (`multihost_utils.process_allgather`) and all stop if any host was signalled. One tiny
          cross-host collective per check.
      "auto" (default): "preemption_service" when JAX's preemption sync manager is running,
          else "allgather".
    Single-host runs just read the flag (every step, `check_every` is ignored).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, sync: str = "auto",
                 check_every: int = 1):
        if sync not in ("auto", "preemption_service", "allgather"):
            raise ValueError(f"sync must be 'auto', 'preemption_service' or 'allgather', "
                             f"got {sync!r}")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.multi_host = jax.process_count() > 1
        if sync == "auto":
            sync = "preemption_service" if (self.multi_host and _preemption_service_on()) \
                else "allgather"
        self.sync = sync if self.multi_host else "local"
        self.check_every = int(check_every)
        self._event = threading.Event()
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._stopped = False
        if self.sync != "preemption_service":
            for signum in signals:
                # signal.signal only works in the main thread; it raises ValueError elsewhere.
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signum = signum
        self._event.set()

    @property
    def signalled(self) -> bool:
        """Whether this process got the signal (this host only, no agreement)."""
        return self._event.is_set()

    @property
    def received_signal(self) -> int | None:
        return self._signum

    def request_stop(self) -> None:
        """Sets this host's flag as the signal would (e.g. from a time limit). Not seen in
        "preemption_service" mode, whose agreement only reacts to JAX's own notice."""
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Whether the run should save and exit after step `step`. Once true it stays true.
        Multi-host: the same answer on every host (see the class docstring)."""
        if self._stopped:
            return True
        if self.sync == "local":
            stop = self._event.is_set()
        elif self.sync == "preemption_service":
            from jax.experimental import multihost_utils
            stop = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        else:
            if step % self.check_every:
                return False
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
            stop = bool(np.any(flags))
        self._stopped = stop
        return stop

    def close(self) -> None:
        """Restores the signal handlers that were installed before. Idempotent."""
        for signum, previous in self._previous.items():
            # None: the old handler was not set from Python; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
