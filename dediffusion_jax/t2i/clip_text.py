"""CLIP text transformer (the frozen decoder's text encoder), a Flax port of transformers' CLIPTextModel.

Why a port: transformers v5 has no Flax models and the last Flax CLIP only took integer ids. De-Diffusion
feeds the text encoder *soft* tokens (Gumbel-softmax vectors over the CLIP vocabulary) and needs
gradients through the token-embedding matmul, so the model accepts three equivalent entries:

- `input_ids` [B, L] int (a tokenizer's output; the usual text-to-image path);
- `soft_tokens` [B, L, V] (one-hot or relaxed) multiplied by the same token-embedding matrix E;
- `token_embeds` [B, L, D] = soft @ E already formed by a caller that avoids keeping the dense
  [B, L, V] tensor (position embeddings not yet added).

Parameter names: the Flax tree mirrors the keys of published CLIP text checkpoints (Stable Diffusion's
`text_encoder/model.safetensors`, written by transformers 4.x): `text_model.embeddings.token_embedding.weight`
-> `text_model/embeddings/token_embedding/embedding`, `text_model.encoder.layers.3.mlp.fc1.weight` ->
`text_model/encoder/layers_3/mlp/fc1/kernel`, so `convert.torch_to_flax(state, abstract, ignore=TORCH_IGNORE)`
loads them with no model-specific code. transformers v5 saves (and its `state_dict()` holds) the same keys
without the `text_model.` prefix; pass `aliases=TORCH_ALIASES` to accept both (see `params_from_torch`).
`convert.flax_to_torch(params)` gives the prefixed (published) layout, which `CLIPTextModel.from_pretrained`
of any transformers version loads; strip `text_model.` for a v5 `load_state_dict`.

The encoder layer (`CLIPEncoderLayer`, `CLIPEncoder`) is shared with the ViT backbone (models/vit.py),
whose CLIP vision tower uses the identical pre-LN block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dediffusion_jax.t2i import convert
from dediffusion_jax.t2i.attention import dot_product_attention
from dediffusion_jax.t2i.custom_grads import exact_gelu
from dediffusion_jax.t2i.nn_blocks import heads_first, tokens_first

Array = jax.Array
Dtype = Any

SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")

# Reference keys that are buffers, not parameters (older transformers saved position_ids persistently).
TORCH_IGNORE: tuple[str, ...] = (r"(^|\.)position_ids$",)
# transformers v5 drops the `text_model.` prefix in CLIPTextModel's own state dict and save_pretrained.
TORCH_ALIASES: dict[str, str] = {r"^(embeddings|encoder|final_layer_norm)\.": r"text_model.\1."}


def activation(name: str):
    """The MLP nonlinearity by its transformers name (OpenAI CLIP: quick_gelu; OpenCLIP: exact gelu)."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return exact_gelu
    raise ValueError(f"hidden_act={name!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")


def check_activation(key: str, value: Any) -> str:
    """Validates a config.json activation name; the error names the key and the value."""
    if value not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"config key {key!r} has unsupported value {value!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. Defaults are OpenAI CLIP ViT-L/14's text tower (Stable Diffusion 1.x)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        check_activation("hidden_act", self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Reads a transformers CLIPTextConfig config.json (a full CLIPConfig's `text_config` works too)."""
        if "text_config" in d and "hidden_size" not in d:
            d = d["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        if "hidden_act" in kwargs:
            check_activation("hidden_act", kwargs["hidden_act"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that transformers.CLIPTextModel (and diffusers pipelines) load."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **dataclasses.asdict(self),
            "attention_dropout": 0.0,
        }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------------------------------
# The encoder block, shared with models/vit.py.


class CLIPAttention(nn.Module):
    """Multi-head self-attention with CLIP's q/k/v/out projections; softmax always in float32."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x: [B, L, D]; mask: boolean [B or 1, 1, L, L] (True = attend) or None."""
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(  # noqa: E731
            self.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name
        )
        q, k, v = (heads_first(dense(name)(x), self.num_heads) for name in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask, scale=head_dim**-0.5)
        return dense("out_proj")(tokens_first(out))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.xavier_uniform()
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, kernel_init=init, name="fc1")(x)
        x = activation(self.hidden_act)(x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=init, name="fc2")(x)


def layer_norm(eps: float, dtype: Dtype, name: str | None) -> nn.LayerNorm:
    """LayerNorm as torch computes it (exact two-pass variance, for parity at 1e-5 on small models)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.)). Same block in CLIP text and vision."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        h = layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask)
        h = layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """A stack of `CLIPEncoderLayer`s named `layers_{i}` (torch: `encoder.layers.{i}`).

    `remat=True` recomputes each layer's activations in the backward pass (memory at scale; same numbers).
    Returns (final hidden state, tuple of hidden states: the input then every layer's output).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, tuple[Array, ...]]:
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        states = [x]
        for i in range(self.num_layers):
            x = layer_cls(
                self.hidden_size,
                self.num_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                self.dtype,
                name=f"layers_{i}",
            )(x, mask)
            states.append(x)
        return x, tuple(states)


# ----------------------------------------------------------------------------------------------------
# The text model.


@flax.struct.dataclass
class CLIPTextOutput:
    """last_hidden_state: [B, L, D] after final_layer_norm (what Stable Diffusion's UNet cross-attends to).
    pooler_output: [B, D] state at the EOS position, or None (token_embeds without eos_positions).
    hidden_states: None, or the embeddings then every layer's output (before final_layer_norm), as
    transformers' `output_hidden_states=True`."""

    last_hidden_state: Array
    pooler_output: Array | None = None
    hidden_states: tuple[Array, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        init = nn.initializers.normal(0.02)
        self.token_embedding = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init)
        self.position_embedding = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init)

    def embed_ids(self, input_ids: Array) -> Array:
        return jnp.take(self.token_embedding.embedding, input_ids, axis=0).astype(self.dtype)

    def embed_soft(self, soft_tokens: Array) -> Array:
        # soft @ E: the differentiable path from the Gumbel-softmax tokens into the frozen decoder.
        table = self.token_embedding.embedding.astype(self.dtype)
        return jnp.einsum("blv,vd->bld", soft_tokens.astype(self.dtype), table)

    def add_positions(self, token_embeds: Array) -> Array:
        l = token_embeds.shape[1]
        if l > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {l} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        pos = self.position_embedding.embedding[:l].astype(self.dtype)
        return token_embeds.astype(self.dtype) + pos[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    remat: bool = False
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.embeddings = CLIPTextEmbeddings(c, self.dtype)
        self.encoder = CLIPEncoder(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_act,
            c.layer_norm_eps,
            self.remat,
            self.dtype,
        )
        self.final_layer_norm = layer_norm(c.layer_norm_eps, self.dtype, None)

    def __call__(
        self,
        input_ids: Array | None,
        attention_mask: Array | None,
        soft_tokens: Array | None,
        token_embeds: Array | None,
        eos_positions: Array | None,
        output_hidden_states: bool,
    ) -> CLIPTextOutput:
        given = [n for n, v in (("input_ids", input_ids), ("soft_tokens", soft_tokens),
                                ("token_embeds", token_embeds)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "CLIPTextModel needs exactly one of input_ids [B, L], soft_tokens [B, L, V] or "
                f"token_embeds [B, L, D]; got {given or 'none'}"
            )
        c = self.config
        if input_ids is not None:
            x = self.embeddings.embed_ids(input_ids)
        elif soft_tokens is not None:
            if soft_tokens.shape[-1] != c.vocab_size:
                raise ValueError(f"soft_tokens last axis {soft_tokens.shape[-1]} != vocab_size {c.vocab_size}")
            x = self.embeddings.embed_soft(soft_tokens)
        else:
            if token_embeds.shape[-1] != c.hidden_size:
                raise ValueError(f"token_embeds last axis {token_embeds.shape[-1]} != hidden_size {c.hidden_size}")
            x = token_embeds
        x = self.embeddings.add_positions(x)
        b, l, _ = x.shape

        mask = jnp.tril(jnp.ones((l, l), dtype=bool))[None, None]  # CLIP is causal, always
        if attention_mask is not None:
            mask = mask & (attention_mask.astype(bool)[:, None, None, :])
        hidden, states = self.encoder(x, mask)
        last = self.final_layer_norm(hidden)

        if eos_positions is None:
            if input_ids is not None:
                eos_positions = eos_positions_from_ids(input_ids, c.eos_token_id)
            elif soft_tokens is not None:
                eos_positions = eos_positions_from_soft(soft_tokens, c.eos_token_id)
        pooled = None
        if eos_positions is not None:
            pooled = jnp.take_along_axis(last, eos_positions.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, pooled, states if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """The CLIP text transformer (causal, pre-LN, learned positions, final LayerNorm).

    Call with exactly one of `input_ids`, `soft_tokens`, `token_embeds` (see module docstring).
    `attention_mask` [B, L] (1 = real token) masks padding keys on top of the causal mask; Stable
    Diffusion does not pass one. `dtype` is the compute dtype (params stay float32).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        *,
        soft_tokens: Array | None = None,
        token_embeds: Array | None = None,
        eos_positions: Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        return CLIPTextTransformer(self.config, self.remat, self.dtype, name="text_model")(
            input_ids, attention_mask, soft_tokens, token_embeds, eos_positions, output_hidden_states
        )


def eos_positions_from_ids(input_ids: Array, eos_token_id: int) -> Array:
    """Where transformers pools: the first `eos_token_id`; for the legacy config value 2 (SD 1.x
    checkpoints), the position of the largest id (the EOT token is the last in CLIP's vocabulary)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def eos_positions_from_soft(soft_tokens: Array, eos_token_id: int) -> Array:
    """Soft-token analogue of `eos_positions_from_ids`, equal to it for one-hot inputs: the position
    with the most EOS weight (first on ties), or for legacy id 2 the largest expected token id."""
    if eos_token_id == 2:
        ids = jnp.arange(soft_tokens.shape[-1], dtype=jnp.float32)
        return jnp.argmax(jnp.einsum("blv,v->bl", soft_tokens.astype(jnp.float32), ids), axis=-1)
    return jnp.argmax(soft_tokens[..., eos_token_id], axis=-1)


def token_embedding_matrix(params: Mapping[str, Any]) -> Array:
    """The [V, D] token-embedding matrix E (accepts `variables` with a "params" key or the params tree).

    Why: a memory-efficient caller forms soft @ E itself and passes `token_embeds`."""
    p = params["params"] if "params" in params else params
    return p["text_model"]["embeddings"]["token_embedding"]["embedding"]


def dummy_inputs(config: CLIPTextConfig, batch: int = 1) -> tuple[Array]:
    """Positional args for `init` / `jax.eval_shape`: int ids [batch, max_position_embeddings]."""
    return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def abstract_params(config: CLIPTextConfig) -> Any:
    """Param shapes (ShapeDtypeStructs) without allocating, for `convert.torch_to_flax`."""
    model = CLIPTextModel(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))["params"]


def params_from_torch(
    state: Mapping[str, np.ndarray], config: CLIPTextConfig, *, source: str = "checkpoint"
) -> dict:
    """A torch-layout state dict (published prefixed keys or transformers v5 keys) -> checked Flax params."""
    return convert.torch_to_flax(
        state, abstract_params(config), source=source, ignore=TORCH_IGNORE, aliases=TORCH_ALIASES
    )
