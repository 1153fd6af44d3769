"""Throughput of the De-Diffusion train step on whatever devices JAX finds, with RANDOM weights.

    python -m bench.throughput --preset sd2-base --batch 8,16,32 --dtype bfloat16 --remat both --out /tmp/bench
    python -m bench.throughput --tiny --out /tmp/bench          # CPU, CI: tiny configs, seconds

The decoder is built from the real Stable Diffusion 2 base configs written below (UNet 320/640/1280/1280,
attention_head_dim [5, 10, 20, 20], linear projection, cross_attention_dim 1024; OpenCLIP-H text
encoder 23 x 1024; the SD VAE; 512 px images = 64x64 latents) and the encoder is the paper's
(configs/paper.py: frozen ViT-L/14 at 280 px, pooler 5 x 1024, 75 tokens, V = 49,408). Nothing is
downloaded: weights are random (throughput does not depend on them) and the tokenizer is a stub
with CLIP's vocabulary size and special ids.

Per (batch, remat, latents) configuration it compiles the trainer's own step (train/step.py:
make_step_fn + compile_step: loss, gradients w.r.t. the encoder, Adafactor update, metrics), runs
`--warmup` steps that are not timed, then times `--steps` steps (each until its outputs are ready)
and reports the median: step ms, images/s (global and per device), XLA's FLOPs per step (per device,
each loop body counted as many times as it runs: dediffusion_jax/loop_flops.py), TFLOP/s,
MFU against the device's bf16 dense peak (PEAK_TFLOPS), XLA's memory analysis and the device's peak
memory (memory_stats, where the backend has it; a process-wide high-water mark, so it only grows
across configurations). A configuration that fails (out of memory) is recorded with its error and
the run goes on. `--max-seconds` skips the configurations left when the budget is spent.

`--batch` is per device; the global batch is batch x device count (data parallel over all devices).
Writes OUT/throughput.json and OUT/throughput.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# `python bench/throughput.py` as well as `python -m bench.throughput`: the repo root on the path.
if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd2-base", choices=("sd2-base", "tiny"))  # = PRESETS
    p.add_argument("--tiny", action="store_true", help="= --preset tiny (CPU, CI)")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes PER DEVICE")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="on", choices=("on", "off", "both"))
    p.add_argument("--latents", default="step", choices=("step", "precomputed", "both"),
                   help="step: the VAE encode runs in the step; precomputed: the batch holds latents")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="skip the configurations left once this much time has passed (0: no limit)")
    p.add_argument("--compare", default="", choices=("", "torch"),
                   help="torch: also time diffusers' PyTorch UNet (fine-tune and frozen input-gradient "
                        "steps) at each batch size, on the same device")
    p.add_argument("--out", default="bench_out")
    return p


if __name__ == "__main__":  # --help answers before jax is imported
    from dediffusion_jax.cli_flags import answer_help_early

    answer_help_early(build_parser)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import paper  # noqa: E402
from dediffusion_jax.models import build as model_build  # noqa: E402
from dediffusion_jax.parallel import sharding as sharding_lib  # noqa: E402
from dediffusion_jax.parallel.mesh import batch_shard_count, make_mesh, replicated  # noqa: E402
from dediffusion_jax.t2i import clip_text, schedules, unet, vae  # noqa: E402
from dediffusion_jax.t2i.folder import DecoderSpec  # noqa: E402
from dediffusion_jax.train import builders, optimizer as optimizer_lib, step as step_lib  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Configs: stabilityai/stable-diffusion-2-base, as written by save_pretrained (keys we read).

SD2_BASE_TEXT = {  # text_encoder/config.json (OpenCLIP ViT-H/14 text tower, penultimate layer: 23)
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 512,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0,
}
SD2_BASE_UNET = {  # unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
    "dual_cross_attention": False, "upcast_attention": False,
}
SD2_BASE_VAE = {  # vae/config.json
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SD2_BASE_SCHEDULER = {  # scheduler/scheduler_config.json
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading",
}

TINY_TEXT = {**SD2_BASE_TEXT, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
             "bos_token_id": 998, "eos_token_id": 999}
TINY_UNET = {**SD2_BASE_UNET, "sample_size": 8, "block_out_channels": [16, 32], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [2, 4],
             "norm_num_groups": 8, "cross_attention_dim": 32}
TINY_VAE = {**SD2_BASE_VAE, "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 16}


@dataclasses.dataclass(frozen=True)
class Preset:
    text: dict
    unet: dict
    vae: dict
    scheduler: dict
    encoder: dict  # config overrides on configs/paper.py


PRESETS = {
    "sd2-base": Preset(SD2_BASE_TEXT, SD2_BASE_UNET, SD2_BASE_VAE, SD2_BASE_SCHEDULER, {}),
    "tiny": Preset(TINY_TEXT, TINY_UNET, TINY_VAE, SD2_BASE_SCHEDULER, {
        "backbone.variant": "Ti/8", "backbone.image_size": 32,
        "backbone.overrides": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64},
        "encoder": {"num_queries": 6, "pooler_blocks": 1, "pooler_width": 32, "pooler_heads": 2}}),
}

assert set(PRESETS) == {"sd2-base", "tiny"}  # build_parser's choices (it runs before this module's imports)

# bf16 dense peak TFLOP/s per chip (vendor datasheets), matched against device_kind, first hit wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v6", 918.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


class StubTokenizer:
    """What the model reads of a CLIP tokenizer (vocabulary size, special ids, context length)."""

    def __init__(self, vocab_size: int, context_length: int, bos: int, eos: int, pad: int) -> None:
        self.vocab_size, self.model_max_length = vocab_size, context_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        self.unk_token_id = eos
        self.all_special_ids = [bos, eos, pad]

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {f"w{i}</w>": i for i in range(self.vocab_size)}

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(f"w{i}" for i in row) for row in ids]


def decoder_spec(preset: Preset) -> DecoderSpec:
    """The decoder's static spec (float32; the model's copy takes the run's dtype and remat)."""
    t = preset.text
    tokenizer = StubTokenizer(t["vocab_size"], t["max_position_embeddings"], t["bos_token_id"],
                              t["eos_token_id"], t["pad_token_id"])
    return DecoderSpec(None, clip_text.CLIPTextConfig.from_dict(t), unet.UNetConfig.from_dict(preset.unet),
                       vae.VAEConfig.from_dict(preset.vae), schedules.NoiseSchedule.from_dict(preset.scheduler),
                       tokenizer, jnp.float32)


def run_config(preset: Preset, dtype: str, remat: bool) -> ml_collections.ConfigDict:
    """configs/paper.py with the benchmark's dtype/remat, random frozen backbone, preset overrides."""
    c = paper.get_config()
    c.backbone.init = ""
    c.vocab.exclude_punctuation = False  # the stub vocabulary has no punctuation
    c.dtype, c.remat = dtype, remat
    for key, value in preset.encoder.items():
        node, *rest = key.split(".")
        if rest:
            c[node][rest[0]] = value
        else:
            c[node].update(value)
    return c


def decoder_modules(spec: DecoderSpec) -> dict[str, tuple[Any, tuple]]:
    """{component: (float32 module, its dummy inputs)}: what the random weights are initialised from."""
    return {"text_encoder": (clip_text.CLIPTextModel(config=spec.text_config), clip_text.dummy_inputs(spec.text_config)),
            "unet": (unet.UNet2DConditionModel(config=spec.unet_config), unet.dummy_inputs(spec.unet_config)),
            "vae": (vae.AutoencoderKL(config=spec.vae_config), vae.dummy_inputs(spec.vae_config))}


def random_decoder_params(spec: DecoderSpec, sharding: Any) -> dict[str, Any]:
    """Random float32 decoder weights, initialised on the devices (nothing crosses the host)."""
    params = {}
    for i, (name, (module, inputs)) in enumerate(decoder_modules(spec).items()):
        init = jax.jit(lambda k, m=module, x=inputs: m.init(k, *x)["params"], out_shardings=sharding)
        params[name] = init(jax.random.key(100 + i))
    return params


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class Setup:
    """What one (dtype, remat) builds once and every batch size reuses."""
    spec: DecoderSpec
    config: ml_collections.ConfigDict
    model: Any
    init_params: Any
    frozen: dict
    mesh: Any


def make_setup(preset: Preset, spec: DecoderSpec, decoder_params: dict, dtype: str, remat: bool,
               mesh: Any, abstract: bool = False) -> Setup:
    """`abstract`: the frozen backbone as shapes only (for `residual_bytes_per_image`; nothing runs)."""
    config = run_config(preset, dtype, remat)
    model, init_params, _ = model_build.build_model(config, spec)
    backbone = lambda: model_build.frozen_backbone(config, init_params, None)  # noqa: E731
    # As the trainer does: the UNet's kernels pre-flipped where config.decoder.flip_conv_kernels says (CPU).
    flipped = lambda: model_build.frozen_unet_input_grad_kernels(config, decoder_params["unet"])  # noqa: E731
    frozen = {"decoder": {**decoder_params, **(jax.eval_shape(flipped) if abstract else flipped())},
              **(jax.eval_shape(backbone) if abstract else backbone())}
    return Setup(spec, config, model, init_params, frozen, mesh)


def residual_bytes_per_image(setup: Setup) -> int:
    """Bytes the backward of the loss keeps from the forward, per image: the residuals of jax.vjp
    w.r.t. the trainable params at batch 2 minus batch 1, read abstractly (eval_shape: nothing runs,
    any backend). What remat trades for recomputation; XLA's temp memory adds its own working space
    (and XLA:CPU's memory analysis does not reflect remat at all: tests/test_mixed_precision.py)."""
    spec, size = setup.spec, int(setup.config.backbone.image_size)
    params = jax.eval_shape(setup.init_params, jax.random.key(0))
    trainable, _ = step_lib.split_params(params, bool(setup.config.backbone.frozen))
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    frozen = abstract(setup.frozen)

    def total(batch_size: int) -> int:
        batch = {"backbone": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                 "decoder": jax.ShapeDtypeStruct((batch_size, spec.image_size, spec.image_size, 3), jnp.float32)}

        def pullback(p: Any, f: Any, b: Any, k: Any) -> Any:
            return jax.vjp(lambda p: setup.model.loss(p, f, b, k, jnp.float32(1.0))[0], p)[1]

        leaves = jax.tree.leaves(jax.eval_shape(pullback, trainable, frozen, batch, jax.random.key(0)))
        return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in leaves
                   if not jnp.issubdtype(r.dtype, jax.dtypes.prng_key))

    return total(2) - total(1)


def time_one(setup: Setup, batch_per_device: int, latents: str, steps: int, warmup: int) -> dict[str, Any]:
    """Compile and time the train step at one batch size."""
    config, mesh, spec = setup.config, setup.mesh, setup.spec
    n_dev = mesh.devices.size
    global_batch = batch_per_device * n_dev
    optimizer = optimizer_lib.make_optimizer(config)
    model = dataclasses.replace(setup.model, batch_shards=batch_shard_count(mesh))  # as the trainer's
    step_fn = step_lib.make_step_fn(model, optimizer, optimizer_lib.make_lr_schedule(config),
                                    builders.build_temperature_fn(config))
    size, dsize = int(config.backbone.image_size), spec.image_size
    rng = np.random.default_rng(0)
    batch = {"backbone": rng.uniform(-1, 1, (global_batch, size, size, 3)).astype(np.float32)}
    if latents == "precomputed":
        batch["latents"] = rng.standard_normal((global_batch, *spec.sample_shape)).astype(np.float32)
    else:
        batch["decoder"] = rng.uniform(-1, 1, (global_batch, dsize, dsize, 3)).astype(np.float32)

    def init_state(key: Any) -> step_lib.TrainState:
        trainable, _ = step_lib.split_params(setup.init_params(key), bool(config.backbone.frozen))
        return step_lib.TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = step_lib.state_shardings_for(abstract, mesh, sharding_lib.ENCODER_RULES)
    state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(int(config.seed)))
    frozen_sh = sharding_lib.tree_shardings(setup.frozen, mesh, sharding_lib.frozen_rules(fsdp=False))
    frozen = jax.device_put(setup.frozen, frozen_sh)
    key = jax.device_put(jax.random.key(1), replicated(mesh))
    fns = step_lib.compile_step(step_fn, state, state_sh, frozen, frozen_sh, batch, mesh, key)
    device_batch = jax.device_put(batch, fns.batch_sharding)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = fns.step(state, frozen, device_batch, key)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    loss = float(jax.device_get(metrics["loss"]))
    step_s = statistics.median(times)
    flops = fns.flops_per_step
    kind = jax.devices()[0].device_kind
    peak = peak_tflops(kind)
    tflops = flops / step_s / 1e12 if flops else None
    return {
        "batch_per_device": batch_per_device, "global_batch": global_batch,
        "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "images_per_s": global_batch / step_s, "images_per_s_per_device": batch_per_device / step_s,
        "flops_per_step_per_device": flops, "xla_flops_per_step_per_device": fns.xla_flops_per_step,
        "tflops_per_s_per_device": tflops,
        "mfu": tflops / peak if (tflops and peak) else None,
        "compile_s": fns.compile_seconds, "xla_memory": fns.memory, "peak_bytes_in_use": peak_memory(),
        "loss": loss, "finite": bool(np.isfinite(loss)), "timed_steps": len(times),
    }


def environment(devices: list | None = None) -> dict[str, Any]:
    """Where a run ran (every benchmark's JSON has it): date, devices, host, jax, bf16 peak."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": devices[0].platform, "device_kind": kind, "device_count": len(devices),
            "host": platform.node(), "jax": jax.__version__, "peak_tflops_bf16": peak_tflops(kind)}


def peak_memory() -> int | None:
    stats = []
    for d in jax.local_devices():
        try:
            s = d.memory_stats()
        except Exception:  # backends without memory stats (CPU)
            s = None
        if s and "peak_bytes_in_use" in s:
            stats.append(int(s["peak_bytes_in_use"]))
    return max(stats) if stats else None


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# De-Diffusion train step throughput ({result['preset']}, {result['dtype']})", "",
             f"{env['date']}; {env['device_count']} x {env['device_kind']} ({env['platform']}); "
             f"jax {env['jax']}; peak {env['peak_tflops_bf16'] or '?'} TFLOP/s bf16 dense per device.",
             f"Command: `{result['command']}`", "",
             "| batch/dev | remat | latents | step ms | img/s | img/s/dev | TFLOP/step/dev | TFLOP/s/dev | MFU | "
             "XLA temp GiB | peak GiB | compile s |", "|" + "---|" * 12]
    def num(x: Any, fmt: str, scale: float = 1.0) -> str:
        return format(x * scale, fmt) if x is not None else "-"

    for r in result["runs"]:
        head = f"| {r['batch_per_device']} | {r['remat']} | {r['latents']} |"
        if "error" in r or "skipped" in r:
            lines.append(head + f" {r.get('error') or r.get('skipped')} |" + " |" * 8)
            continue
        cells = [num(r["step_ms"], ".1f"), num(r["images_per_s"], ".1f"), num(r["images_per_s_per_device"], ".1f"),
                 num(r["flops_per_step_per_device"], ".3g", 1e-12), num(r["tflops_per_s_per_device"], ".3g"),
                 num(r["mfu"], ".1%"), num(r["xla_memory"].get("temp_size_in_bytes"), ".3g", 2**-30),
                 num(r["peak_bytes_in_use"], ".3g", 2**-30), num(r["compile_s"], ".0f")]
        lines.append(head + " " + " | ".join(cells) + " |")
    if result.get("torch"):
        lines += ["", "diffusers' PyTorch UNet alone (same config and batch; ours/torch: our WHOLE De-Diffusion "
                  "step, encoder + text encoder + VAE + UNet, over torch's UNet step):", "",
                  "| batch | torch step | device | step ms | img/s | ours/torch |", "|---|---|---|---|---|---|"]
        for r in result["torch"]:
            if "step_ms" not in r:
                lines.append(f"| {r['batch']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            ratios = ", ".join(f"{k}: {v:.2f}" for k, v in r.get("ours_step_ms_over_torch", {}).items())
            lines.append(f"| {r['batch']} | {r['kind']} | {r['device']} | {r['step_ms']:.1f} | "
                         f"{r['images_per_s']:.1f} | {ratios or '-'} |")
    residuals = ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in result.get("residual_bytes_per_image", {}).items())
    lines += ["", f"Activations kept for the backward, per image (abstract): {residuals}.",
              f"Params: {result['params']}."]
    return "\n".join(lines) + "\n"


def torch_unet_steps(preset: Preset, batch: int, steps: int, warmup: int, dtype: str) -> list[dict]:
    """diffusers' PyTorch UNet2DConditionModel at the same config and batch, on the same kind of device
    (cuda when torch sees one, else CPU): the fine-tune step a user would otherwise run (AdamW,
    autocast to `dtype`, SDPA attention) and a frozen-UNet step with input gradients only (w.r.t. the
    text states: De-Diffusion's use of the UNet). Random weights; UNet only (no text encoder, no VAE)."""
    import torch
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = UNet2DConditionModel.from_config({k: v for k, v in preset.unet.items()}).to(device)
    cfg, ctx = preset.unet, preset.text
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    states = torch.randn(batch, ctx["max_position_embeddings"], cfg["cross_attention_dim"], generator=g).to(device)
    target = torch.randn_like(x)
    autocast = torch.autocast(device_type=device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for kind in ("finetune", "frozen_input_grad"):
        train = kind == "finetune"
        model.requires_grad_(train)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if train else None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            s = states.clone().requires_grad_(not train)
            with autocast:
                loss = torch.nn.functional.mse_loss(model(x, t, s).sample.float(), target)
            loss.backward()
            if train:
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        rows.append({"kind": kind, "device": device, "batch": batch, "step_ms": 1e3 * step_s,
                     "images_per_s": batch / step_s, "torch": torch.__version__,
                     "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    args.batches = [int(b) for b in str(args.batch).split(",") if b]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    preset = PRESETS[args.preset]
    spec = decoder_spec(preset)
    mesh = make_mesh({"data": -1})
    decoder_params = random_decoder_params(spec, replicated(mesh))
    remats = {"on": [True], "off": [False], "both": [True, False]}[args.remat]  # the paper's first
    latents = {"step": ["step"], "precomputed": ["precomputed"], "both": ["step", "precomputed"]}[args.latents]
    result: dict[str, Any] = {
        "preset": args.preset, "dtype": args.dtype,
        "command": "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(), "runs": [],
    }
    for remat in remats:
        setup = make_setup(preset, spec, decoder_params, args.dtype, remat, mesh)
        result["params"] = {"decoder": {k: count(v) for k, v in decoder_params.items()},
                            "encoder": count(jax.eval_shape(setup.init_params, jax.random.key(0)))}
        result.setdefault("residual_bytes_per_image", {})[f"remat={remat}"] = \
            residual_bytes_per_image(setup)
        for lat in latents:
            for b in args.batches:
                row: dict[str, Any] = {"batch_per_device": b, "remat": remat, "latents": lat}
                if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                    row["skipped"] = "time budget spent"
                else:
                    try:
                        row.update(time_one(setup, b, lat, args.steps, args.warmup))
                    except Exception as e:  # an out-of-memory configuration must not end the run
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
    if args.compare == "torch":
        result["torch"] = []
        for b in args.batches:
            if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                result["torch"].append({"batch": b, "skipped": "time budget spent"})
                continue
            try:
                rows = torch_unet_steps(preset, b, args.steps, args.warmup, args.dtype)
            except Exception as e:  # out of memory, no diffusers: recorded, the run goes on
                rows = [{"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
            ours = [r for r in result["runs"] if r["batch_per_device"] == b and "step_ms" in r]
            for row in rows:
                if ours and "step_ms" in row:  # ours: the WHOLE De-Diffusion step per device
                    row["ours_step_ms_over_torch"] = {f"remat={r['remat']},latents={r['latents']}":
                                                      r["step_ms"] / row["step_ms"] for r in ours}
            result["torch"] += rows
    result["total_seconds"] = time.perf_counter() - start
    write_outputs(result, markdown(result), Path(args.out) / "throughput")
    return result


def write_outputs(result: dict, table: str, stem: Path) -> None:
    """STEM.json and STEM.md (every benchmark's pair), and the table on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
