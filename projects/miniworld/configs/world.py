"""De-Diffusion on the miniature world (16x16 scenes, context 16): trains in minutes on a 2-core CPU.

    python -m dediffusion_jax.train --config projects/miniworld/configs/world.py --workdir workdirs/miniworld

Config arg (comma-separated, typed: ARGS below): decoder=PATH (default: the committed world decoder),
backbone=world|scratch|PATH (world, the default: the committed image tower of a small CLIP pre-trained
on the world's train scenes and captions (miniworld/pretrain_backbone.py), FROZEN, as the paper's CoCa
ViT-L; scratch: a random-init ViT of the same shape trained end to end, the paper's "ViT-L random"
ablation; PATH: any CLIPVisionModel folder, frozen), tokens=N
(num_queries, N + 2 <= 16), depth=N (pooler blocks), punct (keep punctuation: the encoder may also
emit the tokenizer's punctuation entries, "," ";" ... as word-final tokens, with vocab=words too), steps=N,
relax=soft|hard (Gumbel-softmax relaxation: soft, the default, or the straight-through hard one),
timesteps=top|half|slide (the loss's noise levels: the upper half (default), the top fifth, or a
window that slides from the top fifth to (0.5, 0.85) over the run),
reduction=log_mean|mean (the batch's denoising loss: the mean of each example's log MSE (default) or
the plain mean (the paper)),
vocab=words|all (what the encoder may emit: the world's whole words and distractors (default) or
every vocabulary entry), diversity=W (weight of the slot-diversity term; default 0.01, not in the paper),
data=DIR (read the world from the tfds dataset `mini_world` prepared in DIR by
`python -m projects.miniworld.tfds_builder --data_dir DIR`, through the standard TfdsSource +
Preprocessor path, instead of rendering scenes on the fly; the views are the same 16x16 images; DIR
may not contain a comma), eval_every=N (the world evaluator every N steps and at the end; 0: none;
default 250),
images=all|single|pool (the training images, the world's analogue of the paper's training-data
ablation, WebLI > ImageNet-1K > COCO; of the 3,648 scenes 364 are held out, leaving 3,284 train
scenes: all (default): every train scene from the generative distribution, 1 or 2 objects
(`miniworld:train`), large and diverse like WebLI; single: the 170 one-object train scenes only
(`miniworld:train:objects=1`), object-centric and less diverse like ImageNet; pool: a fixed set of 64
train scenes drawn once with a seed of its own, the same for every run seed (`miniworld:train:pool=64`),
small like COCO's 83K; images other than all cannot be combined with data=DIR).
"""

from pathlib import Path

from dediffusion_jax import config as common

from projects.miniworld.captions import WORLD_WORDS
from projects.miniworld.tokenizer import DISTRACTORS, PUNCTUATION

# Absolute paths from the installed package: a checkpoint made here loads from any working directory.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_DECODER = str(ASSETS / "decoder")
WORLD_BACKBONE = str(ASSETS / "backbone")

# The typed arguments of this file (`train --config projects/miniworld/configs/world.py --help` lists
# them); one_of(...): its first choice is the default.
ARGS = dict(
    decoder=DEFAULT_DECODER, backbone="world", tokens=12, depth=2, punct=False, steps=1000,
    relax=common.one_of("soft", "hard"), timesteps=common.one_of("half", "top", "slide"),
    reduction=common.one_of("log_mean", "mean"), vocab=common.one_of("words", "all"),
    diversity=0.01, data="", eval_every=250, images=common.one_of("all", "single", "pool"))

# images=...: the data.source of each training image set (module docstring).
IMAGE_SETS = {"all": "miniworld:train", "single": "miniworld:train:objects=1", "pool": "miniworld:train:pool=64"}


def get_config(arg: str | None = None):
    args = common.parse_arg(arg, **ARGS)
    c = common.base_config()
    c.imports = ("projects.miniworld.extensions",)  # registers the miniworld: data source and evaluators
    c.decoder.path = args.decoder
    # ViT patch 4 on the 16x16 image: 16 patches + CLS, width 128, depth 3. Pre-trained and frozen (the
    # paper's setting) or, as its random-init ablation, trained from scratch.
    c.backbone.variant = "S/4"
    c.backbone.image_size = 16
    backbone = args.backbone
    c.backbone.init = "" if backbone == "scratch" else WORLD_BACKBONE if backbone == "world" else backbone
    c.backbone.frozen = backbone != "scratch"
    if backbone == "scratch":  # no folder to say it: the world's own range, [-1, 1]
        c.backbone.mean, c.backbone.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    c.backbone.overrides.update(dict(hidden_size=128, num_layers=3, num_heads=4, mlp_dim=512))
    c.encoder.update(dict(num_queries=args.tokens,
                          pooler_blocks=args.depth,
                          pooler_width=128, pooler_heads=4, mlp_ratio=4))
    c.vocab.exclude_punctuation = not args.punct
    # The world's language is its words plus distractors; the BPE pieces of its tokenizer exist only so
    # that it is a real CLIP-layout BPE, and the decoder never saw them. vocab=words (default) lets the
    # encoder emit whole words only (like CLIP's vocabulary, which is mostly whole words); vocab=all
    # opens all 606 entries (minus punctuation) as the paper does with CLIP's.
    if args.vocab == "words":
        c.vocab.only_tokens = tuple(f"{w}</w>" for w in WORLD_WORDS + DISTRACTORS)
        if args.punct:  # else only_tokens would mask the punctuation that punct keeps
            c.vocab.only_tokens += tuple(f"{p}</w>" for p in PUNCTUATION)
    # Not in the paper. Without it the encoder collapsed within ~100 steps to one text for every image
    # (from scratch: "right" x 12, the word closest to empty text for this decoder; with the frozen world
    # backbone and 0: one word per batch by step 64); 0.01 keeps the slots exploring and the text
    # image-dependent; 0.1 keeps every slot's softmax flat (docs/miniworld.md, "Encoder collapse" and
    # "Tuning the encoder").
    c.quantizer.diversity_weight = args.diversity
    # The noise levels and how the batch's per-example losses are combined: neither is in the paper
    # (its timestep distribution is unstated; its loss is the plain mean). The world default,
    # timesteps=half + reduction=log_mean, is the setting under which the encoder writes shape words:
    # the decoder's v-MSE grows ~20-fold from t = 600 to t = 950, so a plain mean lets the top
    # timesteps (background, colours) supply most of the gradient and shapes (decided at mid noise)
    # are never any slot's argmax; the mean of log MSE counts each example by its relative error.
    # 600-step demo: shape recall 0.75 and world-FID 221.9 vs 308.4 for top + mean, which names the
    # background (0.99 vs 0.20) but no shapes (0.04) (docs/miniworld.md, "Why shape words stay out
    # of the argmax text"). Below t = 500 the text barely matters to this decoder (section "Timesteps").
    #   timesteps=top: (0.8, 1.0); half: (0.5, 1.0); slide: a curriculum from (0.8, 1.0) to
    #   (0.5, 0.85) over the run (sliding by 40% of the run lost the background word).
    timesteps = args.timesteps
    c.loss.timestep_range = (0.5, 1.0) if timesteps == "half" else (0.8, 1.0)
    if timesteps == "slide":
        c.loss.timestep_range_final = (0.5, 0.85)
        c.loss.timestep_ramp_fraction = 1.0
    c.loss.reduction = args.reduction
    c.quantizer.temperature.update(dict(schedule="exponential", start=2.0, end=0.3))
    # The paper does not say whether its Gumbel-softmax is hard (straight-through) or soft. Here soft
    # trains far better: around the random texts a young encoder samples, the straight-through
    # gradient barely ranks the right words above the others (probe --st-ranks), while the soft
    # relaxation's own gradient is exact. 500 steps (timesteps=top, reduction=mean): probe v-MSE of
    # the (argmax) texts 0.0410 soft vs 0.0562 hard, background recall 1.00 vs 0.20 (docs/miniworld.md, "Tuning the encoder").
    c.quantizer.hard = args.relax == "hard"
    c.optimizer.update(dict(name="adamw", b1=0.9, b2=0.999, weight_decay=0.01, grad_clip_norm=1.0,
                        eps=1e-8))
    c.lr.update(dict(schedule="warmup_cosine", peak=1e-3, end=1e-5, warmup_steps=100))
    c.total_steps = args.steps  # 10.7 min at the 1.55 steps/s measured on 2 cores
    c.batch_size = 32
    c.data.source = IMAGE_SETS[args.images]
    if args.data and args.images != "all":
        raise common.ConfigArgError(f"images={args.images} draws scenes on the fly; it cannot be "
                                    f"combined with data={args.data} (use images=all)")
    if args.data:
        # Same views as MiniWorldViews: both are the 16x16 image in [-1, 1] (the world backbone's
        # preprocessor_config.json normalises (x/255 - 0.5) / 0.5, as any folder or tfds source does;
        # a 16 -> 16 resize is an exact copy), no augmentation.
        c.data.source = f"tfds:mini_world:train@{args.data}"
        c.data.preprocess.update(dict(augment=False, decoder_size=0))  # 0: the decoder's size (16)
    c.data.read_threads = 1
    c.mesh.data = -1
    c.checkpoint.update(dict(every_steps=500, keep=2))
    c.log.update(dict(progress_every=100, samples_every=250, num_samples=4))
    # Evaluated while it trains: 64 held-out scenes redrawn from the encoder's texts every eval_every
    # steps and at the end (world-FID, attributes, text recall; eval/world/* in metrics.jsonl and
    # TensorBoard, the redrawing grid as an image); ~15 s each on 2 cores. eval_every=0: no evaluator
    # (e.g. with a decoder that does not draw world scenes).
    if args.eval_every > 0:
        c.evals = {"world": {"type": "miniworld.reconstruction", "every_steps": args.eval_every,
                             "num_scenes": 64, "ddim_steps": 12, "guidance": 1.0}}
    c.lock()
    return c
