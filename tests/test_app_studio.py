"""The web UI's engine (app/engine.py, app/validation.py, app/files.py), in-process on a tiny pipeline: input checks, selections,
PNG metadata, reloading, rename/delete/export. Fast; the server and the browser are tests/test_app.py."""

import hashlib
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import share_diffusers
import share_lab
from app.engine import Studio
from app.files import read_png_metadata
from app.validation import UserError, check_concept_name, check_images, check_trigger, normalize_selection
from share_lab.tiny_pipelines import random_share, tiny_sd

CONCEPT_IMAGES = sorted(share_lab.CONCEPTS.glob("*/train/*.png"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_sd().save_pretrained(folder)
    return folder


@pytest.fixture
def studio(base, tmp_path):
    share = tmp_path / "share.safetensors"
    random_share(tiny_sd(), share)
    return Studio(base, share, tmp_path / "out")


def pixels(path_or_image):
    image = Image.open(path_or_image) if isinstance(path_or_image, (str, Path)) else path_or_image
    return np.asarray(image.convert("RGB"))


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_files(folder, count, size=(32, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.new("RGB", size, (10 * i % 255, 80, 160)).save(path)
        paths.append(path)
    return paths


# -- input checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("", "Give the concept a name"),
    ("   ", "Give the concept a name"),
    ("a/b", r"path or control characters.*'/'"),
    ("a\\b", r"path or control characters.*'\\\\'"),
    ("..", "contains '..'"),
    ("../etc", "contains '..'"),
    ("a\x00b", "path or control characters.*NUL"),
    ("tab\there", "U\\+0009"),
    ("c:name", "path or control characters"),
    ("my.dog", r"not allowed \('\.'\)"),
    ("with space", "not allowed"),
    ("-dash", "must start with a letter or a digit"),
    ("x" * 65, "at most 64"),
    ("cat", "already exists"),
])
def test_bad_concept_names_are_refused_with_a_reason(name, message):
    with pytest.raises(UserError, match=message):
        check_concept_name(name, existing=["cat", "dog"])


def test_good_concept_names_pass():
    for name in ["my-dog", "chien_2", "Ünïcode-Ölé", "42"]:
        assert check_concept_name(name, existing=["cat"]) == name
    assert check_concept_name("  padded ".strip()) == "padded"


@pytest.mark.parametrize("trigger, message", [
    ("", "Give a trigger token"), ("  ", "Give a trigger token"), ("two words", "one word"),
    ("br{ace}", "not allowed"), ("x" * 33, "at most 32"), ("<cat>", "already used by the concept 'cat'"),
])
def test_bad_triggers_are_refused(trigger, message):
    with pytest.raises(UserError, match=message):
        check_trigger(trigger, {"<cat>": "cat"})


def test_the_ui_uses_the_library_rule_for_names_and_triggers():
    """One rule (share_diffusers.names) for the training script and the UI: same verdicts, same messages."""
    from share_diffusers import names

    for name in ["../x", "a/b", "<b>x</b>", "ok-name"]:
        try:
            expected = names.check_concept_name(name)
        except ValueError as e:
            with pytest.raises(UserError, match=re.escape(str(e))):
                check_concept_name(name)
        else:
            assert check_concept_name(name) == expected
    with pytest.raises(ValueError, match="one word"):
        names.check_trigger("two words")


def test_names_from_a_file_are_shown_as_text_not_html():
    """A folded-in file may name a concept anything: the delete confirmation and the merge report escape it."""
    from app.ui import md, report_markdown

    hostile = '<img src=x onerror="alert(1)">*b*|'
    for text in (md(hostile), report_markdown({"concepts": {hostile: {"merge_error": 0.1}}})):
        assert "<img" not in text and "&lt;img" in text and "\\*b\\*" in text and "\\|" in text


def test_image_checks_name_every_bad_file(tmp_path):
    good = image_files(tmp_path / "good", 3)
    assert [c.name for c in check_images(good)] == ["img00.png", "img01.png", "img02.png"]
    with pytest.raises(UserError, match="Upload 3–20 images"):
        check_images([])
    with pytest.raises(UserError, match="Only 2 images: upload at least 3"):
        check_images(good[:2])
    with pytest.raises(UserError, match="21 images: upload at most 20"):
        check_images(image_files(tmp_path / "many", 21))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake = tmp_path / "fake.png"
    fake.write_text("still not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 8)).save(huge)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    with pytest.raises(UserError) as err:
        check_images(good + [text, fake, huge, truncated])
    message = str(err.value)
    for expected in ["notes.txt is not an image", "fake.png is not an image", "huge.png is huge (5000×8 pixels",
                     "truncated.png cannot be read", "nothing was started"]:
        assert expected in message, message


# -- generation -------------------------------------------------------------------------------------


def direct(studio, prompts, selection, seeds, steps=3, guidance=5.0):
    """The same images through the plain pipeline API, for comparison."""
    pipe = studio.pipe
    pipe.set_share_concepts(selection)
    try:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    finally:
        pipe.set_share_concepts(None)


def test_generate_is_the_pipeline_with_that_selection(studio):
    one = studio.generate("a photo of {trigger}", "", "cat", steps=3, seed=11, batch_size=2)
    expected = direct(studio, ["a photo of <cat>"] * 2, "cat", [11, 12])
    for path, image in zip(one.paths, expected):
        np.testing.assert_array_equal(pixels(path), pixels(image))

    mix = {"dog": 0.6, "owl": 0.8}
    two = studio.generate("a photo of {trigger}", "", mix, steps=3, seed=5, batch_size=1)
    np.testing.assert_array_equal(pixels(two.paths[0]), pixels(direct(studio, ["a photo of <dog> <owl>"], mix, [5])[0]))

    per_image = ["cat", None, {"dog": 1.0, "owl": 0.5}]
    three = studio.generate("a photo of {trigger}", "", per_image, steps=3, seed=20, batch_size=3)
    prompts = ["a photo of <cat>", "a photo of", "a photo of <dog> <owl>"]
    expected = direct(studio, prompts, ["cat", None, {"dog": 1.0, "owl": 0.5}], [20, 21, 22])
    for path, image in zip(three.paths, expected):
        np.testing.assert_array_equal(pixels(path), pixels(image))
    assert three.captions == ["cat", "base model", "dog + owl ×0.5"]
    # the concepts really change the images (otherwise the comparisons above prove little)
    assert not np.array_equal(pixels(three.paths[0]), pixels(three.paths[1]))


def test_each_png_records_what_made_it(studio):
    result = studio.generate("a photo of {trigger}", "blurry", {"cat": 0.7, "dog": 0.3}, steps=4, guidance=3.5, seed=9,
                             batch_size=2, sampler="Euler")
    meta = read_png_metadata(result.paths[1])
    record = meta["share_diffusers"]
    assert record["base"] == str(studio.base.resolve())
    assert record["share_file"] == str(studio.share_path.resolve())
    assert record["share_sha256"] == sha(studio.share_path)
    assert record["concepts"] == {"cat": 0.7, "dog": 0.3}
    assert record["triggers"] == {"cat": "<cat>", "dog": "<dog>"}
    assert (record["prompt"], record["negative_prompt"], record["prompt_template"]) == ("a photo of <cat> <dog>", "blurry", "a photo of {trigger}")
    assert (record["seed"], record["steps"], record["guidance_scale"], record["sampler"]) == (10, 4, 3.5, "EulerDiscreteScheduler")
    params = meta["parameters"].splitlines()
    assert params[0] == "a photo of <cat> <dog>" and params[1] == "Negative prompt: blurry"
    for field in ["Steps: 4", "Sampler: EulerDiscreteScheduler", "CFG scale: 3.5", "Seed: 10", "Size: 16x16",
                  'Share concepts: "cat:0.7, dog:0.3"', "Share file: share.safetensors"]:
        assert field in params[2], params[2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(selection="nope"), "Unknown Share concept 'nope'"),
    (dict(selection={"cat": float("nan")}), "finite"),
    (dict(selection={"cat": "lots"}), "must be a number"),
    (dict(selection=["cat", "dog"], batch_size=3), "got 2 selections for a batch of 3"),
    (dict(steps=0), "Steps must be a whole number from 1"),
    (dict(width=20), "multiples of 8"),
    (dict(batch_size=9), "Batch size"),
    (dict(guidance=-1), "Guidance"),
    (dict(sampler="Magic"), "Unknown sampler"),
])
def test_bad_generation_requests_are_refused_before_anything_runs(studio, kwargs, message):
    kwargs = {"selection": None, "steps": 2, **kwargs}
    with pytest.raises(UserError, match=message):
        studio.generate("a photo", "", **kwargs)
    assert not (studio.outputs / "images").exists() or not any((studio.outputs / "images").rglob("*.png"))


def test_normalize_selection_drops_zero_weights():
    assert normalize_selection({"a": 0, "b": 0.0}, ["a", "b"]) is None
    assert normalize_selection({"a": 0, "b": 2}, ["a", "b"]) == {"b": 2.0}
    assert normalize_selection("a", ["a"]) == {"a": 1.0}


def test_threads_get_their_own_concepts(studio):
    requests = [("cat", 1), ({"dog": 1.0}, 2), ({"owl": 0.5, "cat": 0.5}, 3), (None, 4), ("owl", 5), ("dog", 6)]
    alone = [pixels(studio.generate("a photo of {trigger}", "", s, steps=3, seed=seed).paths[0]) for s, seed in requests]
    together = [None] * len(requests)

    def worker(i, s, seed):
        together[i] = pixels(studio.generate("a photo of {trigger}", "", s, steps=3, seed=seed).paths[0])

    threads = [threading.Thread(target=worker, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


# -- the file changing on disk --------------------------------------------------------------------


def test_a_new_file_version_is_loaded_before_the_next_generation(studio):
    state, header = share_diffusers.read_share(studio.share_path)
    share_diffusers.save_share(state.rename("cat", "tiger"), studio.share_path, config=header.get("config"))
    result = studio.generate("x", "", "tiger", steps=2, seed=1)
    assert "Loaded the new version" in result.info
    assert read_png_metadata(result.paths[0])["share_diffusers"]["share_sha256"] == sha(studio.share_path)
    assert studio.loaded.names == ["tiger", "dog", "owl"]


def test_an_unreadable_file_on_disk_keeps_the_previous_version(studio):
    before = pixels(studio.generate("x", "", "dog", steps=2, seed=1).paths[0])
    studio.share_path.write_bytes(b"garbage")
    result = studio.generate("x", "", "dog", steps=2, seed=1)
    assert "could not be loaded" in result.info
    np.testing.assert_array_equal(pixels(result.paths[0]), before)
    with pytest.raises(UserError, match="cannot be loaded"):
        studio.rename("dog", "puppy")
    assert studio.share_path.read_bytes() == b"garbage"


# -- manage --------------------------------------------------------------------------------------------


def test_rename_delete_export(studio, tmp_path):
    studio.rename("cat", "kitty")
    state, _ = share_diffusers.read_share(studio.share_path)
    assert state.names == ["kitty", "dog", "owl"] == studio.loaded.names
    with pytest.raises(UserError, match="already exists"):
        studio.rename("kitty", "dog")
    with pytest.raises(UserError, match="cannot look like a path"):
        studio.rename("kitty", "../kitty")

    path = studio.export_lora("owl")
    factors = share_diffusers.read_lora(path)
    for layer, (B, A) in factors.items():
        torch.testing.assert_close(B @ A.T, state.delta(layer, {"owl": 1.0}), atol=1e-5, rtol=1e-4)

    errors = studio.delete("dog")
    assert set(errors) == {"kitty", "owl"}
    assert studio.loaded.names == ["kitty", "owl"]
    after, _ = share_diffusers.read_share(studio.share_path)
    assert after.names == ["kitty", "owl"]
    for layer in after.layers:  # the others survive the refit (random concepts: the basis holds them exactly)
        torch.testing.assert_close(after.delta(layer, {"owl": 1.0}), state.delta(layer, {"owl": 1.0}), atol=1e-4, rtol=1e-3)
    studio.delete("kitty")
    studio.delete("owl")
    assert studio.loaded.names == []
    assert studio.generate("x", "", None, steps=2, seed=0).paths  # an empty file still generates (the base model)


class RunningJob:
    name, running = "new-thing", True

    def view(self):
        return {"state": "training", "step": 12, "max_steps": 200}


def test_manage_and_learn_are_refused_while_a_job_runs(studio, tmp_path):
    original = studio.share_path.read_bytes()
    studio.job = RunningJob()
    for action, call in [("rename", lambda: studio.rename("cat", "kitty")), ("delete", lambda: studio.delete("cat")),
                         ("start another", lambda: studio.start_learn(image_files(tmp_path / "i", 3), "x", "y"))]:
        with pytest.raises(UserError, match=rf"Cannot {action}.*'new-thing' is being learned \(step 12/200\)"):
            call()
    assert studio.share_path.read_bytes() == original
    assert studio.export_lora("cat").is_file()  # read-only: allowed
    assert studio.generate("x", "", "cat", steps=2, seed=0).paths  # generating is allowed too


def test_bad_learn_requests_write_nothing(studio, tmp_path):
    original = studio.share_path.read_bytes()
    good = image_files(tmp_path / "good", 4)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [
        (dict(files=good, name="cat", trigger="zz"), "already exists"),
        (dict(files=good, name="a/b", trigger="zz"), "path or control"),
        (dict(files=good, name="ok", trigger=""), "Give a trigger token"),
        (dict(files=good, name="ok", trigger="<dog>"), "already used"),
        (dict(files=good[:2], name="ok", trigger="zz"), "Only 2 images"),
        (dict(files=good + [text], name="ok", trigger="zz"), "notes.txt is not an image"),
        (dict(files=good, name="ok", trigger="zz", caption="a photo of something"), "must contain the trigger"),
        (dict(files=good, name="ok", trigger="zz", steps=0), "from 1 to 20000"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            studio.start_learn(**kwargs)
        assert studio.share_path.read_bytes() == original
        assert not (studio.outputs / "jobs").exists()
        assert studio.job is None


@pytest.mark.parametrize("command", [["share-studio"], ["python", "-m", "app"]])
def test_the_web_ui_starts_from_its_console_entry_point_and_as_a_module(command, tmp_path):
    """``share-studio`` is what pyproject.toml installs; ``python -m app`` works from the checkout."""
    bin_dir = Path(sys.executable).parent
    exe = [str(bin_dir / command[0])] if command[0] == "share-studio" else [sys.executable, *command[1:]]
    out = subprocess.run([*exe, "--help"], capture_output=True, text=True, cwd=share_lab.ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--base" in out.stdout and "--share" in out.stdout


def test_the_command_line_refuses_a_missing_base_a_bad_guidance_or_a_file_for_another_base(base, tmp_path):
    from app.ui import main
    from share_lab.tiny_pipelines import tiny_sdxl

    with pytest.raises(SystemExit, match="not a Diffusers pipeline folder.*--base"):
        main(["--base", str(tmp_path / "nowhere"), "--share", str(tmp_path / "s.safetensors"), "--outputs", str(tmp_path)])
    from app.ui import parse_args

    assert parse_args([]).guidance == 1.5 and parse_args(["--base", str(base)]).guidance == 5  # the tiny base's, another's
    for bad in ("-1", "25", "nan"):
        with pytest.raises(SystemExit, match=f"--guidance must be between 0 and 20, got {bad}"):
            main(["--base", str(base), "--guidance", bad, "--outputs", str(tmp_path)])
    other = tmp_path / "other.safetensors"
    random_share(tiny_sdxl(), other)
    with pytest.raises(SystemExit, match="made for another base model"):
        main(["--base", str(base), "--share", str(other), "--outputs", str(tmp_path)])
