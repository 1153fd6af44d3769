"""The paper's setting (PAPER.md): ViT-L/14 @ 280 (paper: CoCa ViT-L @ 288) frozen, 75 tokens, 5x1024 pooler, Adafactor, 500K steps.

    python -m dediffusion_jax.train --config configs/paper.py:decoder=/models/sd2-base,backbone=/models/clip-vit-large-patch14 \\
        --config.data.source=tfds:coco_captions/2014:train --workdir /ckpt/dd

Config arg (comma-separated, typed: ARGS below): decoder=PATH (diffusers folder, e.g.
stable-diffusion-2-base), backbone=PATH (transformers CLIPVisionModel folder), data=SPEC (the data
source, default COCO 2014 train from tfds), runlocal (CPU-sized: tiny ViT, 10 steps, batch 8, tiny
everything; still needs a decoder folder). The same fields can be set with --config.decoder.path,
--config.backbone.init, --config.data.source.

Ablations (one field each; see docs/training.md): encoder.num_queries (5/15/45/75),
encoder.pooler_blocks (3/5/9), vocab.exclude_punctuation, backbone.frozen / backbone.init
('' = random init; train it with backbone.frozen=False), data.source.
"""

from dediffusion_jax import config as common


# The typed arguments of this file (`train --config configs/paper.py --help` lists them).
ARGS = dict(decoder="", backbone="", data="tfds:coco_captions/2014:train", runlocal=False)


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, **ARGS)
    c = common.base_config()
    c.decoder.path = args.decoder
    # The paper's CoCa ViT-L sees 288 px in 18 px patches (16x16 grid). The public stand-in is CLIP
    # ViT-L/14, whose patch 14 does not divide 288: 280 px (20x20 grid) is the nearest size below.
    c.backbone.variant = "L/14"
    c.backbone.image_size = 280
    c.backbone.init = args.backbone
    c.backbone.frozen = True
    c.encoder.update(dict(num_queries=75, pooler_blocks=5, pooler_width=1024, pooler_heads=16))
    c.vocab.exclude_punctuation = True
    c.quantizer.temperature.update(dict(schedule="exponential", start=2.0, end=0.3))
    c.optimizer.update(dict(name="adafactor", b1=0.9, b2=0.999, weight_decay=0.01))
    c.lr.update(dict(schedule="warmup_cosine", peak=3e-4, end=3e-6, warmup_steps=10_000))
    c.total_steps = 500_000
    c.batch_size = 2048
    c.data.source = args.data
    c.data.worker_count = 8
    c.dtype = "bfloat16"
    c.remat = True
    c.checkpoint.update(dict(every_steps=2000, keep=3))
    c.log.update(dict(progress_every=100, samples_every=5000))

    if args.runlocal:
        c.backbone.variant = "Ti/8"
        c.backbone.image_size = 32
        c.backbone.overrides.update(dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64))
        if not args.backbone:
            c.backbone.frozen = False   # a random backbone is trained, never frozen
        c.encoder.update(dict(num_queries=6, pooler_blocks=1, pooler_width=32, pooler_heads=2))
        c.lr.warmup_steps = 2
        c.total_steps = 10
        c.batch_size = 8
        c.data.worker_count = 0
        c.data.read_threads = 2
        c.dtype = "float32"
        c.remat = False
        c.mesh.data = -1
        c.checkpoint.update(dict(every_steps=5, keep=2))
        c.log.update(dict(progress_every=1, samples_every=5, num_samples=2))
    c.lock()
    return c
