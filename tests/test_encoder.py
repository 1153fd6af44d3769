"""DeDiffusionEncoder: backbone -> pooler -> masked vocabulary logits, with an optionally frozen backbone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dediffusion_jax.models import quantizer as q
from dediffusion_jax.models.encoder import DeDiffusionEncoder, EncoderConfig


class PatchBackbone(nn.Module):
    """Stand-in backbone: 4x4 patches -> Dense, returns [B, T, D]."""

    dim: int = 24

    @nn.compact
    def __call__(self, images):
        b, h, w, c = images.shape
        patches = images.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, 16 * c)
        return nn.Dense(self.dim)(patches)


VOCAB = 101
EXCLUDED = (0, 1, 2, 50, 100)


def make(freeze_backbone: bool, backbone=None) -> DeDiffusionEncoder:
    config = EncoderConfig(vocab_size=VOCAB, num_queries=6, pooler_blocks=2, pooler_width=16, pooler_heads=2,
                           excluded_ids=EXCLUDED, freeze_backbone=freeze_backbone)
    return DeDiffusionEncoder(backbone or PatchBackbone(), config)


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))


def test_encoder_logits_are_masked_float32_and_grads_reach_the_head(images):
    encoder = make(freeze_backbone=True)
    params = encoder.init(jax.random.key(1), images)
    assert set(params["params"]) == {"backbone", "pooler", "vocab_head"}
    logits = jax.jit(encoder.apply)(params, images)
    assert logits.shape == (2, 6, VOCAB) and logits.dtype == jnp.float32
    assert np.all(np.asarray(logits)[..., list(EXCLUDED)] <= q.MASK_VALUE / 2)
    assert not np.isin(np.asarray(q.argmax_tokens(logits)), EXCLUDED).any()
    features = encoder.apply(params, images, method=DeDiffusionEncoder.features)
    assert features.shape == (2, 6, 16)

    E = jax.random.normal(jax.random.key(2), (VOCAB, 8))

    def loss(p):  # one Gumbel-softmax step into a stand-in decoder input: soft tokens @ E
        probs = q.gumbel_softmax(encoder.apply(p, images), jax.random.key(3), 2.0, hard=True)
        embeds = q.assemble_soft_tokens(probs, 0, 1, 1, context_length=10) @ E
        return jnp.sum(embeds ** 2)

    grads = jax.grad(loss)(params)["params"]
    assert np.abs(np.asarray(grads["vocab_head"]["dense"]["kernel"])).sum() > 0
    assert np.abs(np.asarray(grads["pooler"]["queries"])).sum() > 0
    # Frozen backbone: stop_gradient on its output, so exactly zero gradient.
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["backbone"]))
    unfrozen = make(freeze_backbone=False)
    grads_unfrozen = jax.grad(lambda p: jnp.sum(unfrozen.apply(p, images)[..., 3:40] ** 2))(params)["params"]
    assert any(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads_unfrozen["backbone"]))


def test_encoder_with_the_projects_vit_backbone(images):
    vit = pytest.importorskip("dediffusion_jax.models.vit")
    config = vit.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    encoder = make(freeze_backbone=True, backbone=vit.ViT(config))
    params = encoder.init(jax.random.key(1), images)
    logits = encoder.apply(params, images)
    assert logits.shape == (2, 6, VOCAB)


def test_fused_embeddings_from_encoder_params_match_the_plain_path(images):
    encoder = make(freeze_backbone=True)
    params = encoder.init(jax.random.key(1), images)
    E = jax.random.normal(jax.random.key(2), (VOCAB, 8))
    mask = np.isin(np.arange(VOCAB), EXCLUDED)
    rng = jax.random.key(5)

    def plain(p):
        return q.gumbel_softmax(encoder.apply(p, images), rng, 0.5, False) @ E

    def fused(p):
        features = encoder.apply(p, images, method=DeDiffusionEncoder.features)
        dense = p["params"]["vocab_head"]["dense"]
        return q.fused_soft_token_embeddings(features, dense["kernel"], dense["bias"], mask, rng, 0.5, False, E)

    np.testing.assert_allclose(fused(params), plain(params), rtol=1e-5, atol=1e-5)
    g_plain = jax.grad(lambda p: jnp.sum(jnp.sin(plain(p))))(params)
    g_fused = jax.grad(lambda p: jnp.sum(jnp.sin(fused(p))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_fused, g_plain)


def test_config_from_dict_rejects_unknown_keys():
    config = EncoderConfig.from_dict({"vocab_size": 10, "excluded_ids": [1, 2]})
    assert config.excluded_ids == (1, 2) and config.num_queries == 75 and config.pooler_blocks == 5
    with pytest.raises(ValueError, match="pooler_blocs"):
        EncoderConfig.from_dict({"vocab_size": 10, "pooler_blocs": 3})
