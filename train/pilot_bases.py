"""Pilot bases for issue 12 step 1: which base design lets the reference LoRA draw a novel concept?

Why: on the shipped tiny base a reference LoRA draws its own concept in 37 % of images. Before
training a v4 base for hours, short pilots (same CPU time each) measure what matters: the
pretraining world (today's five plain shapes vs lab/share_lab/pilot_world.py's rich world),
cross-attention at 8x8 only (today) vs at 16x16 and 8x8 (as Stable Diffusion), and width.

    # once: novel concepts, their identity classifier, VAE round trip (shipped VAE)
    python train/pilot_bases.py prepare
    # one pilot: pretrain (time budget), base quality, untrained-base and reference-LoRA identity
    python train/pilot_bases.py pilot --name P1 --world rich --cross-attn 8 --minutes 12
    # which adapter (attention LoRA, + convolutions, the whole UNet) can draw them on a base
    python train/pilot_bases.py reach --base assets/tiny-base --concepts 3
    # world v2: a decoder for its two-colour detail, then the parts reader trained through it
    python train/pilot_bases.py --concept-world v2 decoder --name D1 --images 16000 --steps 2500
    python train/pilot_bases.py --concept-world v2 --vae runs/pilots/D1/vae prepare --images 12000 --steps 5000 --width 32

Every pilot reuses the shipped VAE (assets/tiny-base/vae; `prepare` measures that it round-trips the
novel concepts) and trains tokenizer, CLIP text encoder and UNet from scratch with
train/pretrain_tiny_base.py's recipe (train_denoiser: linear DDPM schedule, min-SNR, 10 % empty
captions, EMA), for as many steps as fit in --minutes (timed on the first steps, cosine schedule).
Then, per novel concept, the shipped reference-LoRA recipe (training.train_lora_baseline: rank 4
on to_q/k/v/out.0, 400 steps, batch 4, lr 3e-3) on 5 renders, and the classifier on images generated
from held-out prompts (25 steps, guidance 5). Results are merged into docs/results/pilot-bases.json
as each stage ends; checkpoints live under runs/pilots/ (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image, ImageFilter

import share_lab
from share_diffusers import ShareState
from share_diffusers.targets import pipeline_shapes
from share_diffusers.training import Example, attach_new_concept, train_in_process
from share_lab import ROOT, evaluation, parts, world
from share_lab import pilot_world as pw
from share_lab.baselines import train_lora_baseline
from share_lab.classifier import round_trip, through_vae


def _load(name: str):
    """A train/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain = _load("pretrain_tiny_base")
classifier_script = _load("train_classifier")

RUNS = Path(os.environ.get("PILOT_RUNS", ROOT / "runs" / "pilots"))  # overridable for a smoke test
RESULTS = Path(os.environ.get("PILOT_RESULTS", ROOT / "docs" / "results" / "pilot-bases.json"))
SHIPPED_VAE = share_lab.TINY_BASE / "vae"
N_CONCEPTS = 5
CONCEPT_WORLD_SEED = 12
LORA = dict(steps=400, lr=3e-3, batch_size=4, rank=4, seed=0)  # train_reference_loras.REFERENCE
GENERATED_PER_CONCEPT = 24  # the 20 held-out prompts, then 4 of them again, each image its own seed


def record(path: list[str], value) -> None:
    """Merge one value into the results JSON (read-modify-write: nothing is lost if a run dies)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


# Which concepts the pilots are measured on (--concept-world): "novel" = pilot_world's unnamed
# silhouettes in off-palette colours (outside every pretraining world), "v2" = world v2's reserved
# combinations (parts the base can draw, never seen together). Each has its own classifier folder.
CONCEPT_WORLDS = {
    "novel": dict(make=lambda i: pw.make_novel_concept(i, CONCEPT_WORLD_SEED), near_misses=pw.near_misses,
                  near_miss_kinds=2, scene=pw.random_rich_scene, classifier="classifier", key=""),
    "v2": dict(make=pw.make_combination_concept, near_misses=pw.combination_near_misses,
               near_miss_kinds=3, scene=pw.random_v2_scene, classifier="reader-v2", key="-v2"),
}
CONCEPT_WORLD = CONCEPT_WORLDS["novel"]  # set by main()


def concepts() -> list[pw.NovelConcept]:
    return [CONCEPT_WORLD["make"](i) for i in range(N_CONCEPTS)]


VAE = SHIPPED_VAE  # --vae, set by main()


def load_vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(VAE, local_files_only=True).eval()


# --------------------------------------------------------------------------- identity classifier

def labelled_renders(n: int, seed: int, augment: bool):
    """Half concept renders (label k), half "none" (label N): rich and plain scenes, near misses
    (the concept's colours on another silhouette, its silhouette in other colours) and heavily
    blurred concepts, so that neither colours alone nor a smudge count as the concept."""
    rng = np.random.default_rng(seed)
    cs = concepts()
    images, labels = [], []
    for i in range(n):
        k = int(rng.integers(len(cs)))
        background, position = cs[k].contexts(1, rng)[0]
        kind = i % 10
        if kind < 5:
            image, label = cs[k].render(background, position, rng), k
        elif kind < 7:
            image, label = CONCEPT_WORLD["scene"](rng).render(rng), len(cs)
        elif kind == 7:
            image, label = world.random_scene(rng).render(rng), len(cs)
        elif kind == 8:
            image, label = CONCEPT_WORLD["near_misses"](cs[k], 1 + int(rng.integers(CONCEPT_WORLD["near_miss_kinds"])), rng)[-1], len(cs)
        else:
            image = cs[k].render(background, position, rng).filter(ImageFilter.GaussianBlur(rng.uniform(3.5, 6)))
            label = len(cs)
        if augment:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
        images.append(image)
        labels.append(label)
    return evaluation.to_batch(images), torch.tensor(labels)


def load_classifier():
    """What names the concept in an image: the concepts' own classifier, or for world v2 the parts
    reader (`share_lab.parts`)."""
    return evaluation.load_identity_classifier(RUNS / CONCEPT_WORLD["classifier"])


def save_classifier(model) -> None:
    """Into this concept world's classifier folder (world v2's: a parts reader)."""
    parts_reader = CONCEPT_WORLD is CONCEPT_WORLDS["v2"]
    classifier_script.save(model, RUNS / CONCEPT_WORLD["classifier"], **({"kind": "parts"} if parts_reader else {}))


def prepare_parts(args) -> None:
    """World v2: train the parts reader's CNN on role maps of renders (half of them through the
    shipped VAE) and measure it: each part on fresh renders and their round trips, and as an
    identity reader on every one of the 239 concepts (4 held-out renders each; per layout) and on
    near misses (one part wrong: any other name counts as rejected)."""
    start = time.time()
    torch.manual_seed(0)
    vae = load_vae()
    key = "classifier" + CONCEPT_WORLD["key"]
    if args.measure_only:  # the saved reader, measured again (e.g. after a change in how colours are read)
        model = evaluation.load_identity_classifier(RUNS / CONCEPT_WORLD["classifier"]).model
        trained = {k: v for k, v in json.loads(RESULTS.read_text()).get(key, {}).items()
                   if k in ("train_images", "train_steps", "width", "render_seconds")}
    else:
        model = classifier_script.train_parts_reader(vae, args.images, args.steps, args.width)
        save_classifier(model)
        trained = {"train_images": args.images, "train_steps": args.steps, "width": args.width}

    def head_accuracy(images, scenes) -> dict:
        """Each part on renders of objects (all of them objects; a missed object counts as wrong)."""
        read = parts.read(model, images)
        rate = lambda right: float(np.mean([r is not None and right(r, s) for r, s in zip(read, scenes)]))  # noqa: E731
        ordered = [(r, s) for r, s in zip(read, scenes) if s.layout not in pw.SYMMETRIC_LAYOUTS]
        return {"object": rate(lambda r, s: True), "shape": rate(lambda r, s: r["shape"] == s.shape),
                "layout": rate(lambda r, s: r["layout"] == s.layout),
                "colours": rate(lambda r, s: r["colours"] == frozenset(s.colours)),
                "first_colour": float(np.mean([r is not None and r["first"] == s.colours[0] for r, s in ordered])),
                "all_parts": rate(lambda r, s: r["shape"] == s.shape and r["layout"] == s.layout
                                  and r["colours"] == frozenset(s.colours))}

    rng = np.random.default_rng(1)
    fresh = [pw.random_rich_scene(rng, pw.V2_SILHOUETTES, pw.V2_LAYOUTS) for _ in range(600)]
    fresh_images = [s.render(rng) for s in fresh]
    every = [CONCEPT_WORLD["make"](i) for i in range(len(pw.concept_combinations()))]
    reader = parts.PartsReader(model)
    heldout = [(c, s.image) for c in every for s in world.concept_splits(c, 0, 4)[1]]

    def identity(images) -> dict:
        right = [n == c.name for (c, _), n in zip(heldout, reader.predict(images))]
        per_layout = {layout: float(np.mean([r for (c, _), r in zip(heldout, right) if c.layout == layout]))
                      for layout in pw.V2_LAYOUTS[1:]}
        return {"all": float(np.mean(right)), **per_layout}

    misses = [(c, im) for c in every[:40] for im in pw.combination_near_misses(c, 3, np.random.default_rng(c.seed))]
    result = {
        "reader": "colours off the pixels, silhouette and layout by a CNN on role maps (share_lab.parts)", **trained,
        "vae": str(VAE.resolve().relative_to(ROOT)),  # of half the training images and of every round trip measured
        "fresh_renders": head_accuracy(fresh_images, fresh),
        "fresh_renders_vae_round_trip": head_accuracy(round_trip(fresh_images, vae), fresh),
        "concepts": len(every),
        "concept_heldout_identity": identity([im for _, im in heldout]),
        "concept_heldout_vae_round_trip_identity": identity(round_trip([im for _, im in heldout], vae)),
        "near_misses_rejected": float(np.mean([n != c.name for (c, _), n in
                                               zip(misses, reader.predict([im for _, im in misses]))])),
        "seconds": round(time.time() - start),
    }
    record([key], result)
    record(["concepts" + CONCEPT_WORLD["key"]], [{"name": c.name, "trigger": c.trigger} for c in concepts()])
    print(json.dumps(result, indent=2), flush=True)


def colours_kept(images, concepts_of) -> dict:
    """Per two-colour layout, the share of images whose two most-covered pure palette colours are
    their concept's (`parts.colour_reading`): what survives of the colours after a VAE round trip."""
    kept = {}
    for image, concept in zip(images, concepts_of):
        got = {parts.COLOURS[c] for c in parts.colour_reading(image)["colours"][:2]}
        kept.setdefault(concept.layout, []).append(got == {parts.NAMED[tuple(c)] for c in concept.colours})
    return {layout: float(np.mean(v)) for layout, v in sorted(kept.items())} | {
        "all": float(np.mean([x for v in kept.values() for x in v]))}


def decoder(args) -> None:
    """World v2: fine-tune the VAE's decoder on world-v2 scenes (reserved objects excluded). The
    encoder, hence every latent a base was trained on, stays as it is, so the new decoder serves
    any base of this VAE as is (pretrain_tiny_base.train_autoencoder, decoder_only). Measured: the
    concepts' colours after a round trip, per layout, before and after; a grid of 10 concepts' renders,
    their round trips through the VAE before and after (decoder-NAME-v2.png)."""
    start = time.time()
    torch.manual_seed(args.seed)
    vae = load_vae()
    out = RUNS / args.name
    out.mkdir(parents=True, exist_ok=True)
    images = pretrain.to_uint8(pw.rich_scenes(args.images, args.seed + 7, pw.random_v2_scene)[0])
    every = [pw.make_combination_concept(i) for i in range(len(pw.concept_combinations()))]
    owners, renders = zip(*[(c, s.image) for c in every for s in world.concept_splits(c, 0, 2)[1]])
    trips = round_trip(list(renders), vae)
    before = colours_kept(trips, owners)
    rows = [renders[:20:2], trips[:20:2]]  # one held-out render of each of the first 10 concepts, then its round trips
    pretrain.train_autoencoder(vae, images, args.steps, args.batch_size, args.lr, args.seed, out / "decoder.pt",
                               decoder_only=True)
    vae.save_pretrained(out / "vae")
    trips = round_trip(list(renders), vae)
    after = colours_kept(trips, owners)
    save_grid(rows + [trips[:20:2]], RESULTS.parent / f"decoder-{args.name}-v2.png")
    result = {"from": str(VAE.resolve().relative_to(ROOT)), "images": args.images, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "concept_colours_kept_before": before, "concept_colours_kept_after": after,
              "seconds": round(time.time() - start)}
    record(["decoders-v2", args.name], result)
    print(json.dumps(result, indent=2), flush=True)


def prepare(args) -> None:
    """Train the novel-concept classifier (half its renders through the shipped VAE) and measure
    it on fresh held-out renders and on their VAE round trips (question (d) of the issue)."""
    start = time.time()
    torch.manual_seed(0)
    cs = concepts()
    vae = load_vae()
    model = evaluation.IdentityClassifier([c.name for c in cs] + ["none"], width=24)
    x, y = labelled_renders(args.images, seed=0, augment=True)
    half = torch.arange(len(x)) % 2 == 0
    x[half] = through_vae(x[half], vae)
    rendered = time.time() - start
    classifier_script.fit(model, x, lambda logits, index: F.cross_entropy(logits, y[index]), args.steps)
    save_classifier(model)

    # held out: fresh renders (another seed) and each concept's 20 held-out renders
    fx, fy = labelled_renders(1000, seed=1, augment=False)
    hx = evaluation.to_batch([s.image for c in cs for s in world.concept_splits(c, 5, 20)[1]])
    hy = torch.tensor([k for k in range(len(cs)) for _ in range(20)])
    acc = classifier_script.accuracy
    with torch.no_grad():
        round_trip_error = (through_vae(hx, vae) - hx).abs().mean().item() / 2
    result = {
        "classes": model.classes,
        "train_images": args.images, "train_steps": args.steps,
        "fresh_renders_accuracy": acc(model, fx, fy),
        "fresh_renders_vae_round_trip_accuracy": acc(model, through_vae(fx, vae), fy),
        "concept_heldout_accuracy": acc(model, hx, hy),
        "concept_heldout_vae_round_trip_accuracy": acc(model, through_vae(hx, vae), hy),
        "concept_heldout_vae_round_trip_mean_abs_error": round_trip_error,  # 0..1 per channel
        "render_seconds": round(rendered), "seconds": round(time.time() - start),
    }
    record(["classifier" + CONCEPT_WORLD["key"]], result)
    record(["concepts" + CONCEPT_WORLD["key"]], [{"name": c.name, "trigger": c.trigger, "layout": c.layout,
                           "colours": ["#{:02x}{:02x}{:02x}".format(*col) for col in c.colours]} for c in cs])
    print(json.dumps(result, indent=2), flush=True)


# --------------------------------------------------------------------------- pilot bases

def init_from(base: Path, cross_attn: str, width: int, levels: int = 2):
    """Start from a trained base (its tokenizer, text encoder and UNet weights) instead of from scratch.

    Why: 12-20 min of 1-thread CPU from scratch is ~500 steps, too few to form any base (pilot P1
    draws textures), so the design questions are asked as fine-tunings of the shipped base at equal
    cost. Attention blocks the base lacks (cross-attn at 16x16) start with proj_out = 0, so the
    model starts as exactly the base; ``levels=3`` grows a two-level base by a 4x4 level
    (pretrain_tiny_base.add_third_level). Rich-world words that are not in its vocabulary are split
    into several byte-level tokens by its tokenizer and learned by its text encoder.
    """
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    trained = UNet2DConditionModel.from_pretrained(base / "unet")
    if levels == 3 and len(trained.config.block_out_channels) == 2:
        print(f"initialised from {base}, grown by a 4x4 level", flush=True)
        return tokenizer, text_encoder, pretrain.add_third_level(trained)
    unet = pretrain.build_unet(cross_attn, width, levels)
    missing, unexpected = unet.load_state_dict(trained.state_dict(), strict=False)
    assert not unexpected, unexpected
    new_blocks = sorted({k.split(".attentions.")[0] + ".attentions." + k.split(".attentions.")[1].split(".")[0]
                         for k in missing if ".attentions." in k})
    assert all(".attentions." in k for k in missing), missing
    with torch.no_grad():
        for name in new_blocks:
            proj_out = unet.get_submodule(name).proj_out
            proj_out.weight.zero_(), proj_out.bias.zero_()
    print(f"initialised from {base}; new, zero-output attention blocks: {new_blocks}", flush=True)
    return tokenizer, text_encoder, unet


def world_data(kind: str, n: int, seed: int, vae):
    """Scenes and their VAE latents (cached per world: the pilots of one world share them)."""
    scenes, render = pretrain.pretraining_scenes("v1" if kind == "today" else kind, n, seed)
    means, stds = pretrain.encode(vae, render, RUNS / f"latents-{kind}-seed{seed}-{n}.pt")
    return scenes, means, stds


def seconds_per_step(unet, text_encoder, tokenizer, batch_size: int) -> float:
    """Time a few training steps on copies (models untouched) to size the step budget."""
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = tokenizer(["a small red circle on a blue background, top left"] * batch_size, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    times = []
    for _ in range(8):
        t = time.time()
        x = torch.randn(batch_size, 4, 16, 16)
        loss = F.mse_loss(unet(x, torch.randint(0, 1000, (batch_size,)), text_encoder(ids)[0]).sample, x)
        loss.backward(), optimizer.step(), optimizer.zero_grad()
        times.append(time.time() - t)
    return float(np.median(times[3:])) * 1.1  # + data, EMA and logging


def pretrain_pilot(args, out: Path, vae) -> tuple[StableDiffusionPipeline, dict]:
    stage = time.time()
    torch.manual_seed(args.seed)
    if args.init_from:
        tokenizer, text_encoder, unet = init_from(args.init_from, args.cross_attn, args.width, args.levels)
    else:
        words = {"today": world.CAPTION_WORDS, "rich": pw.CAPTION_WORDS, "v2": pw.V2_CAPTION_WORDS}[args.world]
        tokenizer = pretrain.build_tokenizer(out / "tokenizer", words)
        text_encoder, _, _ = pretrain.build_models(tokenizer)
        unet = pretrain.build_unet(args.cross_attn, args.width, args.levels)
    scenes, means, stds = world_data(args.world, args.images, args.seed, vae)
    data_seconds = time.time() - stage
    plan_path = out / "plan.json"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
    else:
        s = seconds_per_step(unet, text_encoder, tokenizer, args.batch_size)
        plan = {"seconds_per_step_estimate": s, "steps": args.steps or max(100, int(args.minutes * 60 / s) // 100 * 100)}
        plan_path.write_text(json.dumps(plan))
    print(f"{args.name}: data {data_seconds:.0f} s; {plan['steps']} steps at ~{plan['seconds_per_step_estimate']:.2f} s", flush=True)
    stage = time.time()
    resumed_at = torch.load(out / "denoiser.pt")["step"] if (out / "denoiser.pt").exists() else 0
    pretrain.train_denoiser(unet, text_encoder, tokenizer, means, stds, vae.config.scaling_factor, scenes,
                            plan["steps"], args.batch_size, args.lr, args.seed, out / "denoiser.pt",
                            prediction_type=args.prediction_type, snr_gamma=args.snr_gamma,
                            snr_floor=args.snr_floor)
    denoiser_seconds = time.time() - stage
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(**pretrain.NOISE_SCHEDULE,
                                                                         prediction_type=args.prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "base")
    info = {"steps": plan["steps"], "resumed_at_step": resumed_at, "data_seconds": round(data_seconds),
            "denoiser_seconds": round(denoiser_seconds),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters())}
    return pipe, info


def load_pipe(path: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def identity(pipe, concept, index, classifier, n: int) -> tuple[float, list[Image.Image]]:
    """Fraction of n images from held-out prompts that the classifier names as the concept."""
    heldout = world.concept_splits(concept, 5, 20)[1]
    captions = [heldout[i % len(heldout)].caption for i in range(n)]
    images = evaluation.generate(pipe, captions, seed=1000 * index)
    labels = classifier.predict(images)
    return float(np.mean([label == concept.name for label in labels])), images


def save_grid(rows: list[list[Image.Image]], path: Path, scale: int = 2) -> None:
    side = world.RESOLUTION * scale
    grid = Image.new("RGB", (side * max(map(len, rows)), side * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (c * side, r * side))
    grid.save(path, optimize=True)


def pilot(args) -> None:
    start = time.time()
    out = RUNS / args.name
    out.mkdir(parents=True, exist_ok=True)
    key = ["pilots" + CONCEPT_WORLD["key"], args.name]
    config = ({"base": str(args.base)} if args.base else
              {k: getattr(args, k) for k in ("world", "cross_attn", "width", "levels", "minutes", "steps", "images", "batch_size", "lr", "seed",
                                  "prediction_type", "snr_gamma", "snr_floor")}
              | ({"init_from": str(args.init_from)} if args.init_from else {}))
    record(key + ["config"], config)
    record(key + ["command"], "python train/pilot_bases.py " + " ".join(sys.argv[1:]))
    vae = load_vae()
    if args.base:  # an existing base (e.g. the shipped one): measure only
        base_dir = args.base
    elif (out / "base" / "model_index.json").exists():
        base_dir = out / "base"
    else:
        _, info = pretrain_pilot(args, out, vae)
        record(key + ["pretraining"], info)
        base_dir = out / "base"

    stage = time.time()
    pipe = load_pipe(base_dir)
    quality = evaluation.base_quality(pipe, n=args.quality_images, classifier=evaluation.load_identity_classifier())
    record(key + ["base_quality"], {**{k: float(v) for k, v in quality.items()}, "images": args.quality_images,
                                    "seconds": round(time.time() - stage)})
    print(f"{args.name}: base quality {quality}", flush=True)

    classifier = load_classifier()
    cs = concepts()
    stage = time.time()
    untrained, untrained_images = {}, {}
    for k, concept in enumerate(cs):
        untrained[concept.name], untrained_images[concept.name] = identity(pipe, concept, k, classifier, args.untrained_generated)
    record(key + ["untrained_identity"], {"per_concept": untrained, "mean": float(np.mean(list(untrained.values()))),
                                          "images_per_concept": args.untrained_generated, "seconds": round(time.time() - stage)})
    print(f"{args.name}: untrained base identity {untrained}", flush=True)

    lora, rows, lora_seconds = {}, [], []
    for k, concept in enumerate(cs):
        stage = time.time()
        pipe = load_pipe(base_dir)
        train, _ = world.concept_splits(concept, 5, 20)
        examples = [Example(s.image, s.caption, Path(f"{concept.name}-{i}.png")) for i, s in enumerate(train)]
        train_lora_baseline(pipe, "reference", examples, args.lora_steps, LORA["lr"], LORA["batch_size"], LORA["rank"], LORA["seed"])
        trained = time.time() - stage
        lora[concept.name], images = identity(pipe, concept, k, classifier, args.generated)
        lora_seconds.append({"train": round(trained), "generate": round(time.time() - stage - trained)})
        rows.append([s.image for s in train[:3]] + images[:6] + untrained_images[concept.name][:2])
        record(key + ["lora_identity"], {"per_concept": lora, "mean": float(np.mean(list(lora.values()))),
                                         "min": float(np.min(list(lora.values()))), "seconds": lora_seconds,
                                         "images_per_concept": args.generated, "recipe": {**LORA, "steps": args.lora_steps}})
        print(f"{args.name}: {concept.name} LoRA identity {lora[concept.name]:.2f} ({time.time() - stage:.0f} s)", flush=True)
    save_grid(rows, RESULTS.parent / f"pilot-bases-{args.name}{CONCEPT_WORLD['key']}.png")
    record(key + ["total_seconds"], round(time.time() - start))
    print(f"{args.name}: done, LoRA identity mean {np.mean(list(lora.values())):.3f} ({(time.time() - start) / 60:.1f} min)", flush=True)


# --------------------------------------------------------------------------- adapter reach

# What an adapter may change, at the shipped recipe's data, batch size and seed. The base has cross-
# attention only at 8x8, so the reference LoRA (attention projections) cannot touch the 16x16 level
# where a silhouette is drawn; the other recipes reach it (convolutions) or change everything.
REACH = {
    "lora-attn": dict(kind="lora", targets=["to_q", "to_k", "to_v", "to_out.0"], steps=400, lr=3e-3),
    "lora-attn-2000": dict(kind="lora", targets=["to_q", "to_k", "to_v", "to_out.0"], steps=2000, lr=3e-3),
    "lora-attn-conv": dict(kind="lora", targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], steps=400, lr=3e-3),
    "full-unet": dict(kind="full", steps=1500, lr=1e-4),
    # Share's own parametrisation (p = 1, φ = 2: learn_concept.py's defaults; lr 1e-2 as the continual runs), the
    # concept's first and only merge being lossless: its images are those of the trained form
    "share-attn": dict(kind="share", targets=["to_q", "to_k", "to_v", "to_out.0"], steps=400, lr=1e-2),
    "share-attn-conv": dict(kind="share", targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], steps=400, lr=1e-2),
}


def train_recipe(pipe, recipe: dict, examples: list[Example]) -> None:
    if recipe["kind"] == "lora":
        train_lora_baseline(pipe, "reach", examples, recipe["steps"], recipe["lr"], LORA["batch_size"], LORA["rank"], LORA["seed"],
                            target_modules=recipe["targets"])
    elif recipe["kind"] == "share":
        state = ShareState.empty(pipeline_shapes(pipe, ["unet"], recipe["targets"]))
        trainer = attach_new_concept({"unet": pipe.unet}, state, p=1, phi=2, seed=LORA["seed"])["unet"]
        train_in_process(pipe, list(trainer.parameters()), examples, recipe["steps"], recipe["lr"], batch_size=LORA["batch_size"],
                         seed=LORA["seed"])  # left attached: the pipeline draws with the trained concept
    else:
        params = list(pipe.unet.parameters())
        train_in_process(pipe, params, examples, recipe["steps"], recipe["lr"], batch_size=LORA["batch_size"], seed=LORA["seed"])
        pipe.unet.requires_grad_(False)


def reach(args) -> None:
    """Generated identity of each adapter recipe in REACH on the first --concepts novel concepts."""
    base_dir = args.base
    classifier, cs = load_classifier(), concepts()[:args.concepts]
    label = base_dir.parent.name if base_dir.name == "base" else base_dir.name  # runs/pilots/P3/base -> P3
    key = ["reach" + CONCEPT_WORLD["key"], label]
    command = "python train/pilot_bases.py " + " ".join(sys.argv[1:])
    for name in args.recipes:
        rows, result = [], {"recipe": REACH[name], "command": command, "per_concept": {}, "seconds": [], "images_per_concept": args.generated}
        for k, concept in enumerate(cs):
            stage = time.time()
            pipe = load_pipe(base_dir)
            train, _ = world.concept_splits(concept, 5, 20)
            train_recipe(pipe, REACH[name], [Example(s.image, s.caption, Path(f"{concept.name}-{i}.png")) for i, s in enumerate(train)])
            trained = time.time() - stage
            result["per_concept"][concept.name], images = identity(pipe, concept, k, classifier, args.generated)
            result["seconds"].append({"train": round(trained), "generate": round(time.time() - stage - trained)})
            result["mean"] = float(np.mean(list(result["per_concept"].values())))
            record(key + [name], result)
            rows.append([s.image for s in train[:3]] + images[:8])
            print(f"reach {name}: {concept.name} identity {result['per_concept'][concept.name]:.2f} ({time.time() - stage:.0f} s)", flush=True)
        save_grid(rows, RESULTS.parent / f"reach-{label}-{name}{CONCEPT_WORLD['key']}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concept-world", choices=list(CONCEPT_WORLDS), default="novel",
                        help="the concepts measured: novel (outside every world) or v2 (world v2's reserved combinations)")
    parser.add_argument("--vae", type=Path, default=SHIPPED_VAE, help="the VAE of new pilots and of round trips")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("decoder", help="world v2: fine-tune the VAE's decoder (latents unchanged)")
    p.add_argument("--name", required=True)
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare")
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--width", type=int, default=24, help="the classifier's first layer's channels (world v2's parts)")
    p.add_argument("--measure-only", action="store_true", help="world v2: measure the saved parts reader again")
    p = sub.add_parser("pilot")
    p.add_argument("--name", required=True)
    p.add_argument("--base", type=Path, help="measure this pipeline instead of pretraining one")
    p.add_argument("--init-from", type=Path, help="fine-tune this base (tokenizer, text encoder, UNet) instead of "
                                                  "training from scratch")
    p.add_argument("--world", choices=("today", "rich", "v2"), default="rich")
    p.add_argument("--cross-attn", choices=("8", "all"), default="8", help="8: at 8x8 only (today); all: 16x16 and 8x8")
    p.add_argument("--width", type=int, default=64, help="block_out_channels = (width, 2 width)")
    p.add_argument("--levels", type=int, choices=(2, 3), default=2, help="3: a 4x4 level of resnets too (grows a "
                                                                           "two-level --init-from)")
    p.add_argument("--minutes", type=float, default=12, help="denoiser time budget (steps sized to fit)")
    p.add_argument("--images", type=int, default=12000)
    p.add_argument("--steps", type=int, help="denoiser steps instead of --minutes: the same CPU cost for designs "
                                             "of different cost per step, whatever the load of a shared CPU")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="what the denoiser predicts (v: the layout comes from the prompt, not the starting noise)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting; 0: none (pretrain_tiny_base.train_denoiser)")
    p.add_argument("--snr-floor", type=float, default=0.0, help="the least weight on a step's x0 error (train_denoiser)")
    p.add_argument("--lr", type=float, default=1e-3, help="7e-4 in the shipped 6000-step recipe; short pilots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality-images", type=int, default=60)
    p.add_argument("--lora-steps", type=int, default=LORA["steps"], help="smoke tests only; the recipe is 400")
    p.add_argument("--generated", type=int, default=GENERATED_PER_CONCEPT, help="generated images per concept")
    p.add_argument("--untrained-generated", type=int, default=12, help="the same for the untrained-base control")
    p = sub.add_parser("reach", help="which adapter recipe can draw a novel concept on a given base")
    p.add_argument("--base", type=Path, default=share_lab.TINY_BASE)
    p.add_argument("--recipes", nargs="+", choices=list(REACH), default=list(REACH))
    p.add_argument("--concepts", type=int, default=N_CONCEPTS)
    p.add_argument("--generated", type=int, default=GENERATED_PER_CONCEPT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CONCEPT_WORLD, VAE
    CONCEPT_WORLD, VAE = CONCEPT_WORLDS[args.concept_world], args.vae
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.command == "prepare" and CONCEPT_WORLD is CONCEPT_WORLDS["v2"]:
        prepare_parts(args)
    else:
        {"prepare": prepare, "pilot": pilot, "reach": reach, "decoder": decoder}[args.command](args)


if __name__ == "__main__":
    main()
