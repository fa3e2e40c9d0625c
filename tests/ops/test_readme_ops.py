"""The README's ops block (any mask, the Pallas kernel, packed documents, score_mod) runs as written, and its masked
calls agree with the same call on the dense parallel form."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from seqlab import ops
from seqlab.core import masks

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_ops_block_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "masks.Strided(8)" in b)
    B, T, H, D = 1, 32, 4, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (B, T, H, D)) for key in keys[:3])
    namespace = dict(q=q, k=k, v=v, gk=-jax.nn.softplus(jax.random.normal(keys[3], (B, T, H, D))), jnp=jnp,
                     segment_ids=jnp.repeat(jnp.arange(4), 8)[None].repeat(B, 0), offsets=jnp.array([0, 5, 32]),
                     g=-jax.nn.softplus(jax.random.normal(keys[3], (B, T, H))), beta=jnp.full((B, T, H), 0.5))
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["o"].shape == (B, T, H, D) and np.all(np.isfinite(namespace["o"]))
    assert namespace["states"].shape == (2, H, D, D)  # one final state per document
    strided = ops.softmax_attn(q, k, v, mask=masks.Strided(8), impl="chunked")
    dense = ops.softmax_attn(q, k, v, mask=masks.Strided(8), impl="parallel")
    np.testing.assert_allclose(strided, dense, atol=1e-5)
