"""Data-parallel inference on 8 fake CPU devices equals single-device inference.

Runs in a subprocess because the device count is fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    import sam_jax
    from sam_jax import inference, sharding
    assert len(jax.devices()) == 8, jax.devices()
    cfg = sam_jax.tiny()
    variables = sam_jax.init_variables(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 128, 128, 3)).astype(np.float32)
    single = np.asarray(inference.embed_images(variables, images, config=cfg))
    mesh = sharding.data_mesh()
    rep = sharding.replicate(variables, mesh)
    emb = inference.embed_images(rep, sharding.shard_batch(images, mesh), config=cfg)
    assert len(emb.sharding.device_set) == 8, emb.sharding
    print("embed max abs diff", np.abs(np.asarray(emb) - single).max())
    assert np.abs(np.asarray(emb) - single).max() < 1e-5
    coords = [rng.uniform(0, 128, (2, 2)) for _ in range(16)]
    labels = [np.array([1, 0])] * 16
    prompts = inference.make_prompt_batch(cfg, coords=coords, labels=labels,
                                          image_index=np.arange(16) % 8)
    ref = inference.decode_prompts(variables, single, prompts, config=cfg)
    sp = prompts._replace(**{k: sharding.shard_batch(getattr(prompts, k), mesh)
                             for k in ("coords", "labels", "mask_inputs", "has_mask",
                                       "image_index")})
    out = inference.decode_prompts(rep, emb, sp, config=cfg)
    assert len(out[0].sharding.device_set) == 8
    d = max(np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(out, ref))
    print("decode max abs diff", d)
    assert d < 1e-5
    print("OK")
""")


def test_data_parallel_on_8_cpu_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
