"""Tests for sam_jax.training.checkpointing: Orbax train checkpoints and the preemption watcher."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.training.checkpointing import (
    CheckpointError,
    PreemptionWatcher,
    TrainCheckpointer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed=0):
    """A small train-state-like tree: params, an optimizer state with a namedtuple, a step."""
    optax = pytest.importorskip("optax")
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(k1, (4, 6)), "b": jax.random.normal(k2, (6,)),
              "norm": {"scale": jnp.ones((6,), jnp.bfloat16)}}
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed, jnp.int32)}


def abstract_of(tree, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        jax.eval_shape(lambda: tree))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_round_trip_and_extra(tmp_path):
    state = make_state(3)
    extra = {"config": {"lr": 1e-3, "model": "tiny"},
             "metrics": {"loss": np.float32(0.25), "iou": jnp.asarray(0.5)}}
    with TrainCheckpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.latest_step() is None
        assert not ckpt.maybe_save(1, state)  # not a multiple of save_every
        assert ckpt.maybe_save(2, state, extra=extra)
        ckpt.wait()
        assert not ckpt.maybe_save(2, state, force=True)  # already saved: no error, no write
        assert ckpt.latest_step() == 2
    with TrainCheckpointer(tmp_path, save_every=2) as ckpt:  # a fresh process would do this
        restored = ckpt.restore(abstract_of(state))
        assert_trees_equal(restored, state)
        assert int(restored["step"]) == 3
        assert ckpt.restore_extra() == {"config": {"lr": 1e-3, "model": "tiny"},
                                        "metrics": {"loss": 0.25, "iou": 0.5}}
        with pytest.raises(CheckpointError, match="no committed checkpoint for step 4"):
            ckpt.restore(abstract_of(state), step=4)


def test_restore_with_nothing_saved(tmp_path):
    with (TrainCheckpointer(tmp_path, save_every=1) as ckpt,
          pytest.raises(CheckpointError, match="no committed checkpoint")):
        ckpt.restore({"a": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_keep_last_n(tmp_path):
    with TrainCheckpointer(tmp_path, save_every=1, keep=2) as ckpt:
        for step in range(5):
            assert ckpt.maybe_save(step, {"x": jnp.full((3,), step, jnp.float32)},
                                   extra={"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.restore_extra(3) == {"step": 3}
        restored = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)}, step=3)
        np.testing.assert_array_equal(restored["x"], [3, 3, 3])
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]


def test_restore_into_named_sharding_and_dtype(tmp_path):
    state = {"w": jnp.arange(8.0).reshape(4, 2), "count": jnp.asarray(7, jnp.int32)}
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        ckpt.maybe_save(0, state)
        ckpt.wait()
        target = {"w": jax.ShapeDtypeStruct((4, 2), jnp.bfloat16, sharding=row),
                  "count": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
        restored = ckpt.restore(target)
        assert restored["w"].sharding == row and restored["count"].sharding == rep
        assert restored["w"].dtype == jnp.bfloat16  # cast to the requested dtype
        np.testing.assert_array_equal(np.asarray(restored["w"], np.float32), state["w"])
        # Leaves without a sharding (plain eval_shape output) come back replicated.
        plain = ckpt.restore(jax.eval_shape(lambda: state))
        assert plain["w"].sharding.is_fully_replicated
        np.testing.assert_array_equal(plain["w"], state["w"])


def test_mismatched_abstract_tree_is_a_clear_error(tmp_path):
    state = {"params": {"w": jnp.ones((4, 6)), "b": jnp.zeros((6,))}, "step": jnp.int32(0)}
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        ckpt.maybe_save(0, state)
        ckpt.wait()
        wrong = {"params": {"w": jax.ShapeDtypeStruct((4, 5), jnp.float32),
                            "extra_bias": jax.ShapeDtypeStruct((6,), jnp.float32)},
                 "step": jax.ShapeDtypeStruct((), jnp.int32)}
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(wrong)
    message = str(info.value)
    assert "does not match abstract_state" in message
    assert "params/w: abstract_state has shape (4, 5), checkpoint has (4, 6)" in message
    assert "missing from checkpoint: params/extra_bias" in message
    assert "in checkpoint but not in abstract_state: params/b" in message


def test_latest_ignores_incomplete_step(tmp_path):
    with TrainCheckpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.maybe_save(1, {"x": jnp.ones(3)})
    # What a save killed before its commit leaves: a temporary directory (Orbax writes
    # `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once complete).
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234567" / "state")
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.latest_step() == 1
        np.testing.assert_array_equal(
            ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})["x"], np.ones(3))
        ckpt.maybe_save(4, {"x": jnp.ones(3)})
    # Opening the directory again removed the leftovers (cleanup_tmp_directories).
    assert sorted(os.listdir(tmp_path)) == ["1", "4"]


def _run(script: str, env_extra=None, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_sigkill_during_async_save_keeps_previous_step(tmp_path):
    script = f"""
        import os, signal, jax.numpy as jnp
        from sam_jax.training.checkpointing import TrainCheckpointer
        ckpt = TrainCheckpointer({str(tmp_path)!r}, save_every=1)
        ckpt.maybe_save(1, {{"x": jnp.ones((4,))}}, extra={{"ok": 1}})
        ckpt.wait()
        big = {{"x": jnp.ones((4,)), "y": jnp.ones((4096, 4096))}}  # 64 MiB still to write
        assert ckpt.maybe_save(2, big)
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write
    """
    result = _run(script)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    print("left by the killed save:", sorted(os.listdir(tmp_path)))
    with TrainCheckpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.latest_step() == 1, os.listdir(tmp_path)
        assert ckpt.restore_extra() == {"ok": 1}
        np.testing.assert_array_equal(
            ckpt.restore({"x": jax.ShapeDtypeStruct((4,), jnp.float32)})["x"], np.ones(4))


def test_async_save_then_wait_is_complete(tmp_path):
    state = make_state(1)
    with TrainCheckpointer(tmp_path, save_every=5, async_save=True) as ckpt:
        assert ckpt.maybe_save(10, state, extra={"a": 1})
        assert not ckpt.maybe_save(10, state, force=True)  # in flight: not started twice
        ckpt.wait()
        entries = os.listdir(tmp_path)
        assert "10" in entries and not any("tmp" in e for e in entries), entries
        assert os.path.exists(tmp_path / "10" / "_CHECKPOINT_METADATA")
        assert_trees_equal(ckpt.restore(abstract_of(state)), state)
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.maybe_save(15, state)


def test_sharded_save_restored_with_other_sharding(tmp_path):
    script = f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from sam_jax.training.checkpointing import TrainCheckpointer
        assert jax.device_count() == 4
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data")))
        with TrainCheckpointer({str(tmp_path)!r}, save_every=1) as ckpt:
            ckpt.maybe_save(0, {{"x": x}})
            ckpt.wait()
            for spec in (P(), P(None, "data")):
                s = NamedSharding(mesh, spec)
                y = ckpt.restore({{"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=s)}})
                assert y["x"].sharding == s, y["x"].sharding
                np.testing.assert_array_equal(y["x"], np.arange(32.0).reshape(8, 4))
        print("OK")
    """
    result = _run(script, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------- preemption
def test_sigterm_sets_flag_and_close_restores_handler():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        watcher = PreemptionWatcher()
        assert watcher.sync == "local"  # single process
        assert not watcher.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test run if not handled
        assert watcher.signalled and watcher.received_signal == signal.SIGTERM
        assert watcher.should_stop(1) and watcher.should_stop(2)
        assert calls == []  # the handler only sets the flag
        watcher.close()
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_watcher_context_manager_and_request_stop():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert signal.getsignal(signal.SIGTERM) != before
        watcher.request_stop()
        assert watcher.should_stop(0)
    assert signal.getsignal(signal.SIGTERM) == before


def test_multi_host_allgather_agrees(monkeypatch):
    """With several processes, the flag is all-gathered so every host stops at the same step:
    here another host was signalled, this one was not."""
    from jax.experimental import multihost_utils
    gathered = []

    def fake_allgather(x):
        gathered.append(int(x))
        return np.asarray([int(x), 1 if len(gathered) > 1 else 0])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    with PreemptionWatcher(sync="allgather", check_every=2) as watcher:
        assert watcher.sync == "allgather"
        assert not watcher.should_stop(0)
        assert not watcher.should_stop(1)  # not a check step: no collective
        assert watcher.should_stop(2)
        assert gathered == [0, 0]
