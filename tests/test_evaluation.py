"""The metrics: normalised scores on the real base, forgetting and drift on damaged models,
continual-learning arithmetic, analytic checks and the classifier on ground-truth renders."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import share_lab
from share_lab import evaluation, world

FAST = dict(steps=10)  # enough steps for recognisable images, short enough for the test budget


def load_base() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(share_lab.TINY_BASE, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_lora(concept) -> StableDiffusionPipeline:
    pipe = load_base()
    pipe.load_lora_weights(concept.reference_lora)
    return pipe


@pytest.fixture(scope="module")
def base():
    return load_base()


@pytest.fixture(scope="module")
def concepts():
    """Two concepts that share no part (silhouette, layout, colours), so one's adapter barely draws the other."""
    return [world.load_concept(share_lab.CONCEPTS / name) for name in ("green-orange-outlined-diamond", "blue-purple-striped-cross")]


@pytest.fixture(scope="module")
def classifier():
    return evaluation.load_identity_classifier()


def test_base_scores_zero_and_reference_lora_scores_one(base, concepts):
    concept = concepts[0]
    assert evaluation.concept_score(base, concept) == pytest.approx(0, abs=1e-3)
    assert evaluation.concept_score(with_lora(concept), concept) == pytest.approx(1, abs=1e-3)


def test_heldout_loss_is_fixed_by_its_seed(base, concepts):
    images, captions = [s.image for s in concepts[0].heldout[:4]], [s.caption for s in concepts[0].heldout[:4]]
    first = evaluation.heldout_loss(base, images, captions, seed=0)
    assert evaluation.heldout_loss(base, images, captions, seed=0) == first
    assert evaluation.heldout_loss(base, images, captions, seed=1) != first


def test_replacing_an_adapter_shows_forgetting(concepts):
    """Naive continual learning: concept 1's LoRA replaces concept 0's, so concept 0 is forgotten."""
    R = np.array([[evaluation.concept_score(with_lora(learned), c) for c in concepts] for learned in concepts])
    metrics = evaluation.continual_metrics(R)
    assert R[0, 0] == pytest.approx(1, abs=1e-3) and R[1, 1] == pytest.approx(1, abs=1e-3)
    assert metrics["forgetting"] > 0.5 and metrics["backward_transfer"] < -0.5


def test_continual_metrics_on_a_hand_made_matrix():
    R = [[0.9, 0.1, 0.0],
         [0.95, 0.8, 0.2],
         [0.6, 0.5, 1.0]]
    assert evaluation.continual_metrics(R) == pytest.approx({
        "average_score": 0.7,
        "plasticity": 0.9,
        "backward_transfer": ((0.6 - 0.9) + (0.5 - 0.8)) / 2,
        "forgetting": ((0.95 - 0.6) + (0.8 - 0.5)) / 2,  # from the best score so far, not the first
        "forward_transfer": (0.1 + 0.2) / 2,
    })
    assert evaluation.continual_metrics([[0.8]])["forgetting"] == 0
    with pytest.raises(ValueError):
        evaluation.continual_metrics([[1.0, 0.0]])


def test_normalized_score():
    assert evaluation.normalized_score(2.0, base_loss=2.0, ref_loss=1.0) == 0
    assert evaluation.normalized_score(1.0, base_loss=2.0, ref_loss=1.0) == 1
    assert evaluation.normalized_score(1.5, base_loss=2.0, ref_loss=1.0) == 0.5


def test_generation_does_not_depend_on_batching(base):
    prompts = evaluation.no_concept_prompts(3)
    one = evaluation.generate(base, prompts, seed=4, batch_size=1, steps=3)
    three = evaluation.generate(base, prompts, seed=4, batch_size=3, steps=3)
    assert max(np.abs(np.subtract(a, b, dtype=float)).max() for a, b in zip(one, three)) <= 2


def test_drift_is_zero_for_the_base_and_large_for_a_damaged_model(base, concepts, classifier):
    prompts = evaluation.no_concept_prompts(4)
    reference = evaluation.generate(base, prompts, **FAST)
    assert evaluation.drift(base, prompts, reference, **FAST) == 0
    lora_drift = evaluation.drift(with_lora(concepts[0]), prompts, reference, **FAST)

    damaged = load_base()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in damaged.unet.named_parameters():
            if "attentions" in name and p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=generator) * 2 * p.std())
    damaged_drift = evaluation.drift(damaged, prompts, reference, **FAST)
    assert 0 < lora_drift < damaged_drift and damaged_drift > 0.05

    quality = lambda pipe: evaluation.base_quality(pipe, n=8, classifier=classifier, **FAST)["all"]
    assert quality(damaged) < quality(base) - 0.3


def test_wilson_interval_has_its_textbook_values_and_its_coverage():
    assert evaluation.wilson_interval(0, 100) == pytest.approx((0.0, 0.0370), abs=1e-4)
    assert evaluation.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert evaluation.wilson_interval(12, 24) == pytest.approx((0.3143, 0.6857), abs=1e-4)
    # the 95 % interval of 100 draws holds the true rate about 95 % of the time, at any rate
    rng = np.random.default_rng(0)
    for rate in (0.05, 0.3, 0.85):
        covered = [lo <= rate <= hi for lo, hi in (evaluation.wilson_interval(int(k), 100) for k in rng.binomial(100, rate, 2000))]
        assert 0.92 <= np.mean(covered) <= 0.98, rate
    with pytest.raises(ValueError, match="hits"):
        evaluation.wilson_interval(5, 4)


def test_untrained_base_cannot_draw_a_concept_but_its_lora_can(base, classifier):
    # the concept whose reference LoRA draws it best (stored by train_reference_loras.py): the weakest
    # reference LoRAs draw their concept in about two images of three, see the README
    concept = max(world.list_concepts(share_lab.CONCEPTS),
                  key=lambda c: c.metadata["evaluation"]["reference_generation"]["identity"])
    assert evaluation.identity_accuracy(base, concept, classifier=classifier, n=8, **FAST) <= 0.25
    assert evaluation.identity_accuracy(with_lora(concept), concept, classifier=classifier, n=8, **FAST) >= 0.5


def test_analytic_checks_read_ground_truth_renders():
    rng = np.random.default_rng(0)
    for scene in [world.random_scene(rng) for _ in range(60)]:
        image = scene.render(rng)
        assert evaluation.background_colour(image) == scene.background
        assert evaluation.object_colour(image) == scene.colour
        assert evaluation.object_position(image) == scene.position
    for concept in world.list_concepts(share_lab.CONCEPTS):
        for sample in concept.heldout[:5]:
            wanted = world.parse_caption(sample.caption)
            assert evaluation.prompt_following([sample.image], [sample.caption]) == {"background": 1, "position": 1}, wanted


def test_base_quality_splits_position_into_column_and_row(monkeypatch, classifier):
    """A "model" that draws every held-out scene mirrored left-right keeps each row but only the
    middle column: position and column score 1/3, row 1."""
    mirrored = {"left": "right", "right": "left"}

    def draw_mirrored(pipe, captions, seed, **kwargs):
        rng = np.random.default_rng(seed)
        scenes = world.heldout_scenes(len(captions), seed)
        assert [s.caption() for s in scenes] == captions
        flip = lambda position: " ".join(mirrored.get(word, word) for word in position.split())
        return [dataclasses.replace(s, position=flip(s.position)).render(rng) for s in scenes]

    monkeypatch.setattr(evaluation, "generate", draw_mirrored)
    quality = evaluation.base_quality(None, n=90, classifier=classifier)
    assert quality["row"] == 1 and quality["column"] == quality["position"] == pytest.approx(1 / 3, abs=0.1)
    assert quality["background"] == quality["colour"] == 1


def test_the_reader_names_fresh_renders_and_their_round_trips(base, classifier):
    """The shipped reader on renders it was not trained on: plain base shapes (their silhouette) and
    every shipped concept (its whole name), as rendered and as the base's VAE gives them back."""
    from share_lab.classifier import round_trip

    rng = np.random.default_rng(123)
    scenes = [world.random_scene(rng) for _ in range(40)]
    assert np.mean([p == s.shape for p, s in zip(classifier.shapes([s.render(rng) for s in scenes]), scenes)]) >= 0.95
    renders, truth = [], []
    for folder in world.list_concepts(share_lab.CONCEPTS):
        concept = folder.generator()
        for background, position in concept.contexts(3, rng):
            renders.append(concept.render(background, position, rng))
            truth.append(folder.name)
    for images in (renders, round_trip(renders, base.vae)):
        assert np.mean([p == t for p, t in zip(classifier.predict(images), truth)]) >= 0.95


def test_discriminative_identity_of_known_adapters_is_their_diagonal(concepts):
    """Each concept's reference LoRA, selected in turn: every held-out image is recognised."""
    pipe = load_base()
    for i, c in enumerate(concepts):
        pipe.load_lora_weights(c.reference_lora, adapter_name=f"c{i}")
    result = evaluation.discriminative_identity(pipe, concepts, lambda c: pipe.set_adapters([f"c{c}"]), images=5)
    assert result["confusion"] == [[5, 0], [0, 5]]
    assert result["accuracy"] == 1.0 and result["per_concept"] == [1.0, 1.0]


def test_discriminative_identity_of_a_base_that_ignores_the_trigger_is_chance(concepts):
    """Both trigger words given one embedding: every candidate explains an image equally well, the
    argmin falls on the first candidate, and the accuracy is exactly 1 / number of concepts."""
    pipe = load_base()
    ids = [pipe.tokenizer.convert_tokens_to_ids(c.trigger + "</w>") for c in concepts]
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[ids[1]] = embeddings[ids[0]]
    result = evaluation.discriminative_identity(pipe, concepts, lambda c: None, images=5)
    assert result["confusion"] == [[5, 0], [5, 0]]
    assert result["accuracy"] == 0.5


def test_continual_metrics_skip_rows_not_measured():
    """A long run scores the old concepts only every few concepts: NaN rows are left out of the
    maxima and the curves, and a matrix without its diagonal is refused."""
    nan = np.nan
    R = np.array([[1.0, nan, nan], [nan, 0.9, nan], [0.5, 0.7, 1.0]])
    metrics = evaluation.continual_metrics(R)
    assert metrics["forgetting"] == pytest.approx(((1.0 - 0.5) + (0.9 - 0.7)) / 2)
    assert np.isnan(metrics["forward_transfer"])
    curves = evaluation.continual_curves(R)
    assert curves["concepts_learned"] == [1, 3]
    assert curves["average_score"] == pytest.approx([1.0, (0.5 + 0.7 + 1.0) / 3])
    with pytest.raises(ValueError, match="diagonal and last row"):
        evaluation.continual_metrics([[nan, nan], [0.5, 1.0]])


def test_the_reference_lora_script_stores_losses_that_normalise_the_score(tmp_path):
    """train/train_reference_loras.py end to end on one concept (a few steps): it writes the LoRA and the
    losses the score is normalised by, and the stored LoRA scores 1 by construction."""
    import json
    import runpy
    import shutil

    folder = shutil.copytree(share_lab.CONCEPTS / "green-orange-outlined-diamond", tmp_path / "green-orange-outlined-diamond",
                             ignore=shutil.ignore_patterns("reference_lora"))
    runpy.run_path(str(share_lab.ROOT / "train" / "train_reference_loras.py"))["main"](
        ["--concepts", str(tmp_path), "--steps", "3", "--skip-generation", "--summary", str(tmp_path / "summary.json")])
    concept = world.load_concept(folder)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["concepts"] == 1 and summary["per_concept"]["green-orange-outlined-diamond"]["reference_lora"]["steps"] == 3
    stored = concept.metadata["evaluation"]
    assert stored["reference_lora"]["steps"] == 3 and stored["base_loss"] != stored["reference_loss"]
    assert evaluation.concept_score(with_lora(concept), concept) == pytest.approx(1.0, abs=1e-4)


def test_the_reference_lora_script_compares_two_runs_concept_by_concept(tmp_path, capsys):
    """--compare (reproducibility across seeds): per-concept gaps in points and how many are within 10."""
    import json
    import runpy
    import shutil

    names = ["green-orange-outlined-diamond", "orange-yellow-split-crescent"]
    for name, identity in zip(names, (0.9, 0.5)):
        concept = world.load_concept(shutil.copytree(share_lab.CONCEPTS / name, tmp_path / "concepts" / name,
                                                     ignore=shutil.ignore_patterns("reference_lora")))
        concept.metadata["evaluation"] = {"base_generation": {"identity": 0.0},
                                          "reference_generation": {"identity": identity, "images": 100}}
        concept.save_metadata()
    other = tmp_path / "seed1.json"
    other.write_text(json.dumps({"per_concept": {
        names[0]: {"reference_generation": {"identity": 0.85, "images": 100}},
        names[1]: {"reference_generation": {"identity": 0.7, "images": 100}}}}))
    main = runpy.run_path(str(share_lab.ROOT / "train" / "train_reference_loras.py"))["main"]
    main(["--concepts", str(tmp_path / "concepts"), "--summary-only", "--summary", str(tmp_path / "s.json"), "--compare", str(other)])
    compared = json.loads((tmp_path / "s.json").read_text())["compared_to"]
    assert compared["gaps_in_points"] == {names[0]: 5.0, names[1]: -20.0}
    assert (compared["within_10_points"], compared["concepts"], compared["images"]) == (1, 2, 100)
    assert "1 within 10" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --compare without a summary to write, or of a missing file
        main(["--concepts", str(tmp_path / "concepts"), "--compare", str(other)])
    with pytest.raises(SystemExit):
        main(["--concepts", str(tmp_path / "concepts"), "--summary", str(tmp_path / "s.json"), "--compare", str(tmp_path / "no.json")])
