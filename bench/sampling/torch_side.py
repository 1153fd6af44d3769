"""diffusers' StableDiffusionPipeline from OUR weights, timed on one device, and compared with our images.

Why in memory: the torch modules are built from the spec's own configs (the `to_dict`s that
folder.save_decoder writes) and loaded strictly from `convert.flax_to_torch(params)`, the same mapping
the parity tests and the folder writer use, so both sides hold the same weights bit for bit and
nothing touches the disk. The pipeline gets prompt embeddings from the torch text encoder on the same
ids (its tokenizer is not needed; the encode is inside the timed call, as ours is) and our initial
noise as `latents` (DDIM's init_noise_sigma is 1), so with eta = 0 both draw the same images.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from dediffusion_jax.t2i import convert
from dediffusion_jax.t2i.folder import DecoderSpec


def load_strict(build: Callable[[], Any], params: Any) -> Any:
    """A torch module from `build()` holding `params` (Flax tree), every key matched (strict).

    Built on the meta device and the weights assigned, so SD2-base's 1.3 B parameters are not
    randomly initialised first; a module with non-persistent buffers (CLIP's position_ids) is built
    normally instead. transformers v5 drops CLIP's `text_model.` prefix: keys are matched either way."""
    import torch

    state = {k: torch.from_numpy(np.require(v, requirements="W"))  # (jax's host copies are read-only)
             for k, v in convert.flax_to_torch(jax_to_numpy(params)).items()}
    with torch.device("meta"):
        module = build()
    if any(b.is_meta for _, b in module.named_buffers()):
        module = build()
    want = set(module.state_dict())
    state = {k if k in want else k.removeprefix("text_model."): v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def jax_to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def build_pipeline(spec: DecoderSpec, params: dict, device: str) -> Any:
    """StableDiffusionPipeline (DDIMScheduler from our schedule, SDPA attention) on `device`."""
    import diffusers
    import transformers
    from diffusers.models.attention_processor import AttnProcessor2_0

    text = load_strict(lambda: transformers.CLIPTextModel(
        transformers.CLIPTextConfig.from_dict(spec.text_config.to_dict())), params["text_encoder"])
    unet = load_strict(lambda: diffusers.UNet2DConditionModel.from_config(spec.unet_config.to_dict()),
                       params["unet"])
    vae = load_strict(lambda: diffusers.AutoencoderKL.from_config(spec.vae_config.to_dict()), params["vae"])
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(spec.schedule.to_dict()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_pipeline(pipe: Any, spec: DecoderSpec, inputs: Any, args: Any, device: str) -> tuple[dict, np.ndarray]:
    """--warmup untimed then --repeats timed batches of the same prompts and noise; -> (row, images)."""
    import torch

    dtype = args.dtype if device == "cuda" else "float32"  # autocast on the GPU; float32 on CPU
    autocast = torch.autocast(device_type=device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    ids = torch.from_numpy(inputs.ids).long().to(device)
    uncond = torch.from_numpy(inputs.uncond).long().to(device)
    latents = torch.from_numpy(inputs.x_T.transpose(0, 3, 1, 2).copy()).to(device)  # NHWC -> NCHW
    guided = args.guidance != 1.0

    def run() -> np.ndarray:
        with torch.inference_mode(), autocast:
            cond = pipe.text_encoder(ids)[0]  # last_hidden_state, as the pipeline encodes a prompt
            neg = pipe.text_encoder(uncond)[0] if guided else None
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, height=spec.image_size,
                       width=spec.image_size, num_inference_steps=args.ddim_steps,
                       guidance_scale=args.guidance, eta=0.0, latents=latents.clone(), output_type="np")
        return out.images  # float32 [B, H, W, 3] in [0, 1], on the host

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, images = [], None
    for _ in range(args.warmup + args.repeats):
        start = time.perf_counter()
        images = run()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    batch_s, b = statistics.median(timed), len(inputs.ids)
    row = {"batch": b, "device": device, "dtype": dtype, "attention": "sdpa", "first_batch_s": times[0],
           "batch_ms": 1e3 * batch_s, "batch_ms_min": 1e3 * min(timed), "batch_ms_max": 1e3 * max(timed),
           "images_per_s": b / batch_s, "timed_batches": len(timed), "threads": torch.get_num_threads(),
           "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
    return row, images


def parity(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    """Ours against diffusers' images of the same prompts and noise, in [0, 1] units and in uint8."""
    u8 = lambda x: np.round(x * 255).astype(np.int32)  # noqa: E731 (diffusers' numpy_to_pil rounding)
    return {"images": len(theirs), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "uint8_max_diff": int(np.abs(u8(ours) - u8(theirs)).max()),
            "unclamped_fraction": float(np.mean((theirs > 0) & (theirs < 1)))}


def compare(spec: DecoderSpec, params: dict, args: Any, cases: list, over: Callable[[], bool]) -> list[dict]:
    """One row per batch size: torch's figures, ours/torch images/s per device, parity in float32.

    `cases`: (batch per device, that many of our inputs, our row, our images of them or None)."""
    import diffusers
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if over():
        return [{"batch": b, "skipped": "time budget spent"} for b, *_ in cases]
    try:
        start = time.perf_counter()
        pipe = build_pipeline(spec, params, device)
        build_s = time.perf_counter() - start
    except Exception as e:  # no diffusers, a config diffusers refuses: recorded, the run ends well
        return [{"error": f"building the pipeline: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
    for b, inputs, ours, ours_images in cases:
        if over():
            rows.append({"batch": b, "skipped": "time budget spent"})
            continue
        try:
            row, images = time_pipeline(pipe, spec, inputs, args, device)
        except Exception as e:  # out of memory: recorded, the run goes on
            rows.append({"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        row.update(build_s=build_s, torch=torch.__version__, diffusers=diffusers.__version__)
        if "images_per_s_per_device" in ours:
            row["ours_over_torch_images_per_s"] = ours["images_per_s_per_device"] / row["images_per_s"]
        if ours_images is not None and args.dtype == row["dtype"] == "float32":
            row["parity"] = parity(ours_images, images)
        else:  # bf16 on one side or both: the images differ by rounding, not checked
            row["parity"] = None
        rows.append(row)
    return rows
