"""The decoder's Attention against the official one, on every path it can take.

Between a few prompt tokens and many image tokens our Attention folds the image-side
projection into the token side when that is cheaper (transformer.py); with few tokens it does,
with many it does not. The tiny model's 8x8 image grid never reaches those paths, so they are
checked here directly: D=64, 4 heads, downsample 2, N=256 image tokens, 3 prompts.
"""

import numpy as np
import pytest
import torch

from official import max_abs_diff
from sam_jax.modeling import transformer as ours

D, HEADS, RATE, N, B = 64, 4, 2, 256, 3


def _pair(seed):
    from segment_anything.modeling.transformer import Attention as OfficialAttention
    torch.manual_seed(seed)
    official = OfficialAttention(D, HEADS, downsample_rate=RATE).eval()
    variables = {"params": {name: {"kernel": layer.weight.detach().numpy().T,
                                   "bias": layer.bias.detach().numpy()}
                            for name, layer in official.named_children()}}
    return official, ours.Attention(D, HEADS, RATE), variables


def _paths(module, variables, *args):
    """The attention helpers a call goes through."""
    taken = []
    names = ("_token_to_image_folded", "_image_to_token_folded", "_attention_small_side")
    originals = {n: getattr(ours, n) for n in names}
    try:
        for n in names:
            setattr(ours, n, (lambda n: lambda *a: (taken.append(n), originals[n](*a))[1])(n))
        out = module.apply(variables, *args)
    finally:
        for n, f in originals.items():
            setattr(ours, n, f)
    return taken, np.asarray(out)


@pytest.mark.parametrize("tokens,folded", [(5, True), (40, False)])
def test_tokens_to_image(tokens, folded):
    official, module, variables = _pair(0)
    r = np.random.default_rng(1)
    q = r.normal(size=(B, tokens, D)).astype(np.float32)
    k, v = (r.normal(size=(B, N, D)).astype(np.float32) for _ in range(2))
    taken, out = _paths(module, variables, q, k, v)
    assert taken == ["_token_to_image_folded" if folded else "_attention_small_side"]
    with torch.no_grad():
        expected = official(*(torch.from_numpy(x) for x in (q, k, v))).numpy()
    assert out.shape == expected.shape == (B, tokens, D)
    assert max_abs_diff(out, expected) < 1e-5


@pytest.mark.parametrize("tokens,folded", [(5, True), (40, False)])
def test_image_to_tokens_shared_queries_with_padding(tokens, folded):
    """Image tokens shared by the prompts (batch 1), prompts padded to `tokens` with a mask:
    equal to the official attention of each prompt over its real tokens only."""
    official, module, variables = _pair(2)
    r = np.random.default_rng(3)
    q = r.normal(size=(1, N, D)).astype(np.float32)
    k, v = (r.normal(size=(B, tokens, D)).astype(np.float32) for _ in range(2))
    real = [tokens, tokens - 2, 1]
    mask = np.arange(tokens)[None, :] < np.asarray(real)[:, None]
    taken, out = _paths(module, variables, q, k, v, mask)
    assert taken == ["_image_to_token_folded" if folded else "_attention_small_side"]
    assert out.shape == (B, N, D)
    for i, t in enumerate(real):
        with torch.no_grad():
            expected = official(torch.from_numpy(q[0][None]), torch.from_numpy(k[i:i + 1, :t]),
                                torch.from_numpy(v[i:i + 1, :t])).numpy()
        assert max_abs_diff(out[i:i + 1], expected) < 1e-5


def test_folded_and_plain_paths_agree_for_per_prompt_image_tokens():
    """Image tokens per prompt (as after the first layer): the folded image->token attention
    equals the plain one computed by the official module."""
    official, module, variables = _pair(4)
    r = np.random.default_rng(5)
    q = r.normal(size=(B, N, D)).astype(np.float32)
    k, v = (r.normal(size=(B, 5, D)).astype(np.float32) for _ in range(2))
    taken, out = _paths(module, variables, q, k, v)
    assert taken == ["_image_to_token_folded"]
    with torch.no_grad():
        expected = official(*(torch.from_numpy(x) for x in (q, k, v))).numpy()
    assert max_abs_diff(out, expected) < 1e-5
