"""The procedural world: deterministic, its splits disjoint, its captions parseable."""

import numpy as np
import pytest

import share_lab
from share_lab import pilot_world as pw
from share_lab import world


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_pixels_different_seed_different_pixels():
    a, b = world.make_concept(3), world.make_concept(3)
    assert a.description == b.description
    for x, y in zip(*(world.concept_splits(c, 2, 2)[1] for c in (a, b))):
        assert np.array_equal(pixels(x.image), pixels(y.image)) and x.caption == y.caption
    other = world.concept_splits(world.make_concept(3, world_seed=1), 1, 1)[0][0]
    assert not np.array_equal(pixels(other.image), pixels(world.concept_splits(a, 1, 1)[0][0].image))

    scenes = [world.random_scene(np.random.default_rng(5)) for _ in range(2)]
    renders = [s.render(np.random.default_rng(9)) for s in scenes]
    assert scenes[0] == scenes[1] and np.array_equal(pixels(renders[0]), pixels(renders[1]))


def test_shipped_concepts_are_what_the_generator_makes():
    shipped = world.list_concepts(share_lab.CONCEPTS)
    assert len(shipped) >= 10
    for folder in shipped:
        concept = folder.generator()
        assert folder.metadata | concept.metadata() == folder.metadata  # json agrees with the generator
        train, heldout = world.concept_splits(concept, len(folder.train), len(folder.heldout))
        for stored, fresh in zip(folder.train + folder.heldout, train + heldout):
            assert stored.caption == fresh.caption
            assert np.array_equal(pixels(stored.image), pixels(fresh.image)), folder.name


def test_concept_folders_have_captioned_train_and_heldout_images():
    for folder in world.list_concepts(share_lab.CONCEPTS):
        assert 3 <= len(folder.train) <= 10 and len(folder.heldout) >= 15
        for sample in folder.train + folder.heldout:
            assert sample.image.size == (world.RESOLUTION, world.RESOLUTION)
            assert sample.caption.startswith(folder.metadata["instance_prompt"] + " on a ")
        contexts = lambda samples: {(p["background"], p["position"])
                                    for p in (world.parse_caption(s.caption) for s in samples)}
        assert not contexts(folder.train) & contexts(folder.heldout), "held-out contexts must be new"


def test_heldout_combos_never_appear_in_pretraining():
    rng = np.random.default_rng(0)
    assert len(world.HELDOUT_COMBOS) == 200
    assert not {world.random_scene(rng).combo for _ in range(5000)} & world.HELDOUT_COMBOS
    assert {s.combo for s in world.heldout_scenes(200)} == world.HELDOUT_COMBOS


def test_trigger_words_are_fresh_letter_only_words():
    triggers = world.TRIGGER_WORDS
    assert len(triggers) == 64 == len(set(triggers))
    assert all(t.isalpha() and t.islower() for t in triggers)
    assert not set(triggers) & set(pw.V2_CAPTION_WORDS)  # world v2's words include v1's
    rng = np.random.default_rng(0)
    for sample in (world.random_scene, pw.random_v2_scene):
        for _ in range(500):
            caption = world.pretraining_caption(sample(rng), rng)
            assert set(caption.replace(",", " ").split()) <= set(pw.V2_CAPTION_WORDS), caption


def test_beyond_the_reserved_words_triggers_are_two_of_them_run_together():
    from share_diffusers.names import check_trigger

    triggers = [world.trigger_word(i) for i in range(200)]
    assert triggers[:64] == list(world.TRIGGER_WORDS) and len(set(triggers)) == 200
    assert all(check_trigger(t) == t and t.isalpha() for t in triggers)
    assert world.trigger_word(64) == world.TRIGGER_WORDS[0] + world.TRIGGER_WORDS[0]
    assert world.make_concept(150).trigger == triggers[150] and world.make_concept(150).name.endswith("-150")
    for index in (-1, world.MAX_CONCEPTS):
        with pytest.raises(ValueError, match=f"at most 1000 concepts, got index {index}"):
            world.make_concept(index)


def test_world_v2_never_shows_a_concept_combination_in_pretraining():
    from share_lab import pilot_world as pw
    combos = pw.concept_combinations()
    assert len(combos) == len(set(combos)) >= 200
    rng = np.random.default_rng(0)
    seen = {(s.shape, s.layout, s.colours) for s in (pw.random_v2_scene(rng) for _ in range(5000))}
    # never the same object, whichever colour a split or striped one names first
    assert not {pw._object_key(*o) for o in seen} & {pw._object_key(*c) for c in combos}
    # ... while every part of a concept is drawn in pretraining: each silhouette with each layout, each colour pair
    assert {(shape, layout) for shape, layout, _ in seen} == {(s, x) for s in pw.V2_SILHOUETTES for x in pw.V2_LAYOUTS}
    assert {colours for _, layout, colours in seen if layout != "solid"} >= {c for _, _, c in combos}


def test_a_world_v2_concept_is_its_combination_and_its_near_misses_are_not():
    from share_lab import pilot_world as pw
    concept = pw.make_combination_concept(2)
    shape, layout, colours = pw.concept_combinations()[2]
    assert concept.name == f"{colours[0]}-{colours[1]}-{layout}-{shape}" and concept.layout == layout
    assert not set(colours) & set(concept.backgrounds)
    image = pixels(world.concept_splits(concept, 1, 0)[0][0].image).reshape(-1, 3)
    for name in colours:  # both of its colours are drawn, exactly (flat regions of the render)
        assert (np.abs(image - np.array(world.COLOURS[name])).sum(axis=1) == 0).sum() > 20, name
    rng = np.random.default_rng(0)
    misses = pw.combination_near_misses(concept, 3, rng)
    renders = [s.image for s in world.concept_splits(concept, 5, 0)[0]]
    for miss in misses:
        assert all(np.abs(pixels(miss) - pixels(r)).mean() > 1 for r in renders)
    with pytest.raises(ValueError, match="239 concepts"):
        pw.make_combination_concept(239)


def test_parts_of_a_combination_concept_name_it_and_one_wrong_part_does_not():
    from share_lab import parts
    from share_lab import pilot_world as pw
    combos = pw.concept_combinations()
    for layout in ("outlined", "striped"):
        i = next(i for i, (_, x, _) in enumerate(combos) if x == layout)
        concept, (shape, _, colours) = pw.make_combination_concept(i), combos[i]
        right = {"shape": shape, "layout": layout, "colours": frozenset(colours), "first": colours[0]}
        assert parts.name(right) == concept.name
        other_shape = next(s for s in pw.V2_SILHOUETTES if s != shape)
        other_colour = next(c for c in world.COLOURS if c not in colours)
        for wrong in ({"shape": other_shape}, {"layout": "dotted"},
                      {"colours": frozenset({colours[0], other_colour})}):
            assert parts.name(right | wrong) != concept.name, wrong
        assert parts.name(None) == "none"  # no clear object
        # the colour named first matters where the layout orders them (an outline is not a body), not in stripes
        assert (parts.name(right | {"first": colours[1]}) == concept.name) == (layout == "striped")
    t = parts.targets([None])
    assert t["object"].tolist() == [0.0] and t["shape"].tolist() == t["layout"].tolist() == [-1]


def test_colours_are_read_off_the_pixels_body_first():
    """On renders of concepts of each two-colour layout, the two most-covered pure colours are the
    concept's, and the body of an outlined or dotted object is told from its outline or dots."""
    from share_lab import parts
    from share_lab import pilot_world as pw
    combos = pw.concept_combinations()
    for layout in pw.V2_LAYOUTS[1:]:
        i = next(i for i, (_, x, _) in enumerate(combos) if x == layout)
        concept, (_, _, colours) = pw.make_combination_concept(i), combos[i]
        for sample in world.concept_splits(concept, 2, 0)[0]:
            reading = parts.colour_reading(sample.image)
            got = [parts.COLOURS[c] for c in reading["colours"][:2]]
            assert set(got) == set(colours), (concept.name, got)
            assert parts.COLOURS[reading["background"]] not in colours
            if layout in ("outlined", "dotted"):  # the body lies deeper than an outline, covers more than dots
                depth, counts = reading["depth"], reading["counts"]
                body, other = [parts.COLOURS.index(c) for c in colours]
                assert (depth[body] > depth[other]) if layout == "outlined" else (counts[body] > counts[other])
            roles = parts.role_map(sample.image, reading)
            assert roles.shape == (3, world.RESOLUTION, world.RESOLUTION) and roles.min() >= -1 and roles.max() <= 1
            # the background channel is high on the border, the body's channel at some object pixels
            assert roles[0, 0].mean() > 0.9 and roles[1].max() > 0.9


def test_a_saved_parts_reader_loads_as_an_identity_classifier(tmp_path):
    """evaluation.load_identity_classifier gives a PartsReader for a folder saved with kind "parts";
    whatever its CNN says, a plain background has no object and reads "none"."""
    import json

    from PIL import Image
    from safetensors.torch import save_file

    from share_lab import evaluation, parts
    from share_lab import pilot_world as pw
    model = parts.new_classifier(8)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"classes": model.classes, "width": 8, "kind": "parts"}))
    reader = evaluation.load_identity_classifier(tmp_path)
    assert isinstance(reader, parts.PartsReader)
    blank = Image.new("RGB", (64, 64), world.COLOURS["green"])
    render = world.concept_splits(pw.make_combination_concept(0), 1, 0)[0][0].image
    names = reader.predict([blank, render])
    assert names[0] == "none" and len(names) == 2


def test_a_world_v2_concept_folder_records_its_parts(tmp_path):
    from share_lab import pilot_world as pw
    concept = pw.make_combination_concept(3)
    folder = world.load_concept(world.write_concept(concept, tmp_path, 2, 3))
    assert folder.name == concept.name and len(folder.train) == 2 and len(folder.heldout) == 3
    parts = folder.metadata["parts"]
    assert folder.metadata["world"] == "v2" and parts["layout"] == concept.layout
    assert "-".join(parts["colours"] + [parts["layout"], parts["shape"]]) == concept.name
    assert all(s.caption.startswith(f"a photo of {concept.trigger} on a ") for s in folder.train)
    assert folder.generator().metadata() == concept.metadata()  # the folder knows what made it
    folder.metadata["world"] = "v9"
    with pytest.raises(ValueError, match="unknown concept world 'v9'"):
        folder.generator()
