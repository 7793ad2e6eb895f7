"""The web UI end to end: `share-studio` (the console entry point) started on a free port of 127.0.0.1, driven by a real
headless Chromium (Playwright, sync API) and by gradio_client. Offline; torn down at the end with
a check that no process (server or learn job) is left behind.

Uses the shipped tiny base and demo Share file (or $SHARE_APP_TEST_BASE / $SHARE_APP_TEST_SHARE);
a Share file with fewer than two concepts is replaced by three random ones. The browser test
prints the time from pressing Generate to the first image and saves the README screenshot,
docs/images/ui.png.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from share_lab import CONCEPTS, DEMO_SHARE, ROOT, TINY_BASE

SCREENSHOT = ROOT / "docs" / "images" / "ui.png"
STUDIO = Path(sys.executable).parent / "share-studio"  # the console entry point pyproject.toml installs
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a photo of {trigger}"
STEPS = 10


# -- the server ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_size(base: Path) -> int:
    unet = json.loads((base / "unet" / "config.json").read_text())
    vae = json.loads((base / "vae" / "config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def concept_count(path: Path) -> int:
    import share_diffusers

    return len(share_diffusers.read_share(path)[0].names)


class Server:
    """The app on a copy of the Share file. Base and file: $SHARE_APP_TEST_BASE / $SHARE_APP_TEST_SHARE if set,
    else the shipped tiny base and demo file; random concepts when the file has fewer than two."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        base, share = os.environ.get("SHARE_APP_TEST_BASE"), os.environ.get("SHARE_APP_TEST_SHARE")
        if base:
            self.base = Path(base)
        else:  # the shipped tiny base and demo Share file
            self.base = TINY_BASE
            share = share or str(DEMO_SHARE)
        self.share = tmp / "share.safetensors"
        if share and concept_count(Path(share)) >= 2:
            shutil.copyfile(share, self.share)
            self.share_source = f"{Path(share).name} {sha(share)[:12]}"
        else:
            self.share_source = "random concepts"
            from diffusers import DiffusionPipeline

            from share_lab.tiny_pipelines import random_share

            random_share(DiffusionPipeline.from_pretrained(self.base, local_files_only=True), self.share,
                         names=("cat", "dog", "owl"))
        self.outputs = tmp / "outputs"
        self.size = native_size(self.base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tmp / "server.log"
        env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio-cache"), GRADIO_ANALYTICS_ENABLED="False",
                   HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(STUDIO), "--base", str(self.base), "--share", str(self.share),
                 "--outputs", str(self.outputs), "--port", str(self.port), "--device", "cpu", "--guidance", "1.5"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the app did not answer within 180 s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """SIGTERM (the app cancels its learn job and exits); returns processes that outlived it (killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(0.5)
        left = processes_mentioning(str(self.tmp))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("app"))
    yield server
    left = server.stop()
    assert not left, f"processes left behind by the app: {left}"
    assert server.proc.returncode is not None


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


# -- helpers ------------------------------------------------------------------------------------------


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def concept_names(client) -> list[str]:
    return [c["name"] for c in client.predict(api_name="/concepts")]


def generate(client, server, selection, seed, batch=1, job=False):
    args = (PROMPT, "", json.dumps(selection), STEPS, 5.0, seed, server.size, server.size, batch, "DDIM")
    return client.submit(*args, api_name="/generate") if job else client.predict(*args, api_name="/generate")


def pixels(result) -> list[np.ndarray]:
    gallery, _info = result
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


def png_record(result, index=0) -> dict:
    with Image.open(result[0][index]["image"]) as im:
        return json.loads(im.text["share_diffusers"])


def learn_status(client) -> dict:
    return client.predict(api_name="/learn_status")


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def training_images(index=-1, count=4) -> list[Path]:
    folder = sorted(p.parent for p in CONCEPTS.glob("*/concept.json"))[index]
    return sorted((folder / "train").glob("*.png"))[:count]


def free_trigger(client, preferred="zqxj") -> str:
    taken = {c["trigger"] for c in client.predict(api_name="/concepts")}
    return next(t for t in [preferred, "vlorp", "quibz", "zazzle"] if t not in taken)


# -- the browser ----------------------------------------------------------------------------------------


def save_screenshot(page, server) -> Path:
    """The README screenshot, small enough to commit (256-colour palette: the UI is flat colours).

    docs/images/ui.png is replaced when it was made from another base or Share file than this run's
    (e.g. the shipped tiny base and demo file have just arrived), or with UPDATE_SCREENSHOT=1; other
    runs write it to the test's folder only, so running the tests does not change tracked files.
    """
    source = f"{server.base.name} + {server.share_source}"
    shot = server.tmp / "ui.png"
    page.screenshot(path=str(shot))
    info = PngInfo()
    info.add_text("Source", source)
    image = Image.open(shot).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(shot, optimize=True, pnginfo=info)
    old = Image.open(SCREENSHOT).text.get("Source") if SCREENSHOT.is_file() else None
    if os.environ.get("UPDATE_SCREENSHOT") == "1" or old != source:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    return shot


def test_browser_pick_generate_learn(server, client, capsys):
    pytest.importorskip("playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: apt-get install chromium (scripts/test.sh does)")
    from playwright.sync_api import expect, sync_playwright

    names = concept_names(client)
    new_name, trigger = "web-learned", free_trigger(client)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page = context.new_page()
            page.goto(server.url)
            page.wait_for_selector("#weight-0", timeout=60_000)
            # every concept of the file is in the picker, with its trigger
            expect(page.locator(".concept-weight")).to_have_count(len(names))
            expect(page.locator("#weight-0")).to_contain_text(names[0])
            expect(page.locator("#guidance input[type=number]")).to_have_value("1.5")  # --guidance

            # pick a concept, generate: images appear
            weight = page.locator("#weight-0 input[type=number]")
            weight.fill("1")
            weight.press("Enter")
            page.locator("#seed input").fill("1234")
            started = time.perf_counter()
            page.click("#generate")
            page.wait_for_selector("#gallery img", timeout=60_000)
            latency = time.perf_counter() - started
            expect(page.locator("#gallery img")).to_have_count(4, timeout=30_000)
            expect(page.locator("#generate-info")).to_contain_text("4 images in")
            with capsys.disabled():
                print(f"\n[web UI] first image on screen {latency:.2f} s after pressing Generate; "
                      f"{page.inner_text('#generate-info').splitlines()[0]} "
                      f"(base {server.base.name}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')})")
            # a mix on the sliders, and one concept per image of one batch: base | a | b | the mix
            second = page.locator("#weight-1 input[type=number]")
            second.fill("0.6")
            second.press("Enter")
            page.locator("#per-image input").check()
            for i, option in enumerate(["Base model", names[0], names[1], "Slider mix"]):
                page.locator(f"#image-pick-{i} input").click()
                page.locator(f"#image-pick-{i}").get_by_role("option", name=option, exact=True).click()
            page.click("#generate")
            captions = ["base model", names[0], names[1], f"{names[0]} + {names[1]} ×0.6"]
            for caption in captions:
                expect(page.locator("#gallery")).to_contain_text(caption, timeout=60_000)
            page.evaluate("window.scrollTo(0, 0)")
            save_screenshot(page, server)

            # learn: a bad upload is explained in the UI, then a good one runs to the end
            page.get_by_role("tab", name="Learn").click()
            files = page.locator("#learn-files input[type=file]")
            files.set_input_files([str(p) for p in training_images(count=2)])
            expect(page.locator("#upload-check")).to_contain_text("Only 2 images: upload at least 3", timeout=30_000)
            page.locator("#learn-name textarea").fill("a/b")
            page.locator("#learn-trigger textarea").fill(trigger)
            page.click("#learn")
            expect(page.get_by_text("contains path or control characters").first).to_be_visible(timeout=30_000)
            page.locator("button.toast-close, .toast-close").first.click()

            page.locator("#learn-files button[aria-label='Clear']").first.click()
            files.set_input_files([str(p) for p in training_images(count=4)])
            expect(page.locator("#upload-check")).to_contain_text("4 images, ready", timeout=30_000)
            page.locator("#learn-name textarea").fill(new_name)
            steps = page.locator("#learn-steps input[type=number]")
            steps.fill("4")
            steps.press("Enter")
            page.click("#learn")
            page.wait_for_selector(f"#learn-text[data-state=done]:has-text('{new_name}')", timeout=300_000)
            expect(page.locator("#learn-status")).to_contain_text("Learned")
            expect(page.locator("#learn-report")).to_contain_text(new_name)
            for name in names:  # the merge report lists every old concept
                expect(page.locator("#learn-report")).to_contain_text(name)

            # the new concept is in the picker of the open page, and in the Manage table
            page.get_by_role("tab", name="Generate").click()
            expect(page.locator(".concept-weight")).to_have_count(len(names) + 1, timeout=30_000)
            expect(page.locator(".concept-weight").last).to_contain_text(new_name)
            expect(page.locator(".concept-weight").last).to_contain_text(trigger)
            page.get_by_role("tab", name="Manage").click()
            expect(page.locator("#manage-table")).to_contain_text(new_name)
        finally:
            browser.close()
    assert concept_names(client) == names + [new_name]
    result = generate(client, server, new_name, seed=3)
    assert png_record(result)["share_sha256"] == sha(server.share)  # generated from the new file


# -- gradio_client ---------------------------------------------------------------------------------------


def test_parallel_requests_get_the_same_images_as_one_after_another(server, client):
    names = concept_names(client)
    a, b = names[0], names[1]
    requests = [(a, 1, 1), (b, 2, 1), ({a: 0.5, b: 0.8}, 3, 1), ([a, None, b, {a: 1.0, b: 1.0}], 4, 4),
                (None, 5, 1), (b, 6, 2), (a, 7, 1), ({b: 1.5}, 8, 1)]
    users = [client, Client(server.url, verbose=False, download_files=client.download_files)]
    jobs = [generate(users[i % 2], server, s, seed, batch, job=True) for i, (s, seed, batch) in enumerate(requests)]
    parallel = [pixels(job.result(timeout=300)) for job in jobs]
    one_by_one = [pixels(generate(client, server, s, seed, batch)) for s, seed, batch in requests]
    for (selection, _, _), p, q in zip(requests, parallel, one_by_one):
        assert len(p) == len(q)
        for x, y in zip(p, q):
            np.testing.assert_array_equal(x, y, err_msg=f"selection {selection}")
    # and the concepts really differ (the comparison above would be empty otherwise)
    base, with_a, with_b = generate(client, server, None, 10), generate(client, server, a, 10), generate(client, server, b, 10)
    assert not np.array_equal(pixels(base)[0], pixels(with_a)[0])
    assert not np.array_equal(pixels(with_a)[0], pixels(with_b)[0])
    # the per-image batch: image i used selection i, recorded in its PNG
    per_image = generate(client, server, [a, None, b], 11, batch=3)
    assert [png_record(per_image, i)["concepts"] for i in range(3)] == [{a: 1.0}, None, {b: 1.0}]


def make_bad_uploads(folder: Path) -> dict[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    good = [str(p) for p in training_images(0, count=3)]
    notes = folder / "notes.txt"
    notes.write_text("not an image")
    fake = folder / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    huge = folder / "huge.png"
    Image.new("L", (8000, 8)).save(huge)
    many = []
    for i in range(21):
        Image.new("RGB", (32, 32), (i * 12, 30, 200)).save(folder / f"many{i:02d}.png")
        many.append(str(folder / f"many{i:02d}.png"))
    return {"good": good, "notes": good + [str(notes)], "fake": good + [str(fake)], "huge": good + [str(huge)],
            "few": good[:2], "many": many}


def test_bad_learn_inputs_get_a_clear_message_and_change_nothing(server, client, tmp_path):
    uploads = make_bad_uploads(tmp_path)
    existing = concept_names(client)[0]
    cases = [
        ("notes", "ok-name", "zz", "notes.txt is not an image"),
        ("fake", "ok-name", "zz", "fake.png (is not an image|cannot be read)"),
        ("huge", "ok-name", "zz", r"huge.png is huge \(8000×8 pixels"),
        ("few", "ok-name", "zz", "Only 2 images: upload at least 3"),
        ("many", "ok-name", "zz", "21 images: upload at most 20"),
        ("good", existing, "zz", f"A concept named '{existing}' already exists"),
        ("good", "../evil", "zz", r"contains '\.\.'"),
        ("good", "a/b", "zz", "path or control characters.*'/'"),
        ("good", "a\\b", "zz", "path or control characters"),
        ("good", "nul\x00name", "zz", "path or control characters.*NUL"),
        ("good", "ok-name", "", "Give a trigger token"),
        ("good", "ok-name", "two words", "one word"),
        ("good", "", "zz", "Give the concept a name"),
    ]
    before = server.share.read_bytes()
    jobs_before = sorted((server.outputs / "jobs").glob("*")) if (server.outputs / "jobs").exists() else []
    for upload, name, trigger, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict([handle_file(p) for p in uploads[upload]], name, trigger, PROMPT, 4, api_name="/learn")
        assert server.share.read_bytes() == before, (upload, name)
        jobs_now = sorted((server.outputs / "jobs").glob("*")) if (server.outputs / "jobs").exists() else []
        assert jobs_now == jobs_before, (upload, name)
        assert learn_status(client)["state"] in ("idle", "done", "cancelled", "failed")


def test_while_learning_generation_works_manage_waits_and_cancel_restores(server, client):
    names = concept_names(client)
    before = server.share.read_bytes()
    client.predict([handle_file(str(p)) for p in training_images(1)], "slowpoke", free_trigger(client, "slwpk"),
                   PROMPT, 2000, api_name="/learn")
    status = wait_for(lambda: (s := learn_status(client))["state"] == "training" and s["step"] >= 1 and s, 240,
                      "the learn job to start training")
    pid = status["pid"]
    # generating meanwhile works, with the old file
    result = generate(client, server, names[0], seed=2)
    assert png_record(result)["share_sha256"] == hashlib.sha256(before).hexdigest()
    # file changes wait for the job, with a message that says why
    blocked = [
        (lambda: client.predict(names[0], "renamed", api_name="/rename"), "Cannot rename a concept while the concept 'slowpoke' is being learned"),
        (lambda: client.predict(names[0], api_name="/delete"), "Cannot delete a concept while"),
        (lambda: client.predict([handle_file(str(p)) for p in training_images(2)], "other", "othr", PROMPT, 4, api_name="/learn"),
         "Cannot start another learn job while"),
    ]
    for call, message in blocked:
        with pytest.raises(AppError, match=message):
            call()
    message = client.predict(api_name="/cancel_learn")
    assert "exactly as it was" in message, message
    assert learn_status(client)["state"] == "cancelled"
    assert server.share.read_bytes() == before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert concept_names(client) == names


def test_rename_export_delete(server, client, tmp_path):
    names = concept_names(client)
    old = names[-1]
    for new, message in [(names[0], "already exists"), ("x/y", "path or control"), ("", "Give the concept a name")]:
        before = server.share.read_bytes()
        with pytest.raises(AppError, match=message):
            client.predict(old, new, api_name="/rename")
        assert server.share.read_bytes() == before
    message = client.predict(old, "renamed-one", api_name="/rename")
    assert "Renamed" in message
    assert concept_names(client) == names[:-1] + ["renamed-one"]

    message, lora = client.predict("renamed-one", api_name="/export_lora")
    assert lora.endswith("renamed-one.safetensors")
    import share_diffusers

    factors = share_diffusers.read_lora(lora)
    state, _ = share_diffusers.read_share(server.share)
    layer, (B, A) = next(iter(factors.items()))
    np.testing.assert_allclose((B @ A.T).numpy(), state.delta(layer, {"renamed-one": 1.0}).numpy(), atol=1e-5)

    with pytest.raises(AppError, match="not in the Share file"):
        client.predict("no-such-concept", api_name="/delete")
    message = client.predict("renamed-one", api_name="/delete")
    message = message[-1] if isinstance(message, (list, tuple)) else message
    assert "Deleted 'renamed-one'" in message and all(n in message for n in names[:-1])
    assert concept_names(client) == names[:-1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_file_route_serves_generated_images_and_nothing_else_of_the_outputs(server, client):
    """GET /gradio_api/file=<path> over real HTTP: the Share file, its model card, learn jobs' uploads,
    log and command, exports and the saved images themselves are refused; the generated image is served
    from Gradio's cache, under a folder named by its content's hash."""
    result = generate(client, server, concept_names(client)[0], seed=3)
    record = png_record(result)
    saved = next((server.outputs / "images").rglob(Path(result[0][0]["image"]).name))
    cached = [p for p in (server.tmp / "gradio-cache").rglob(saved.name) if p.read_bytes() == saved.read_bytes()]
    assert cached and record["seed"] == 3
    route = f"{server.url}gradio_api/file="
    assert http_status(route + str(cached[0])) == 200
    job = server.outputs / "jobs" / "planted"  # what a learn job leaves, in case none has run in this session
    (job / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(training_images(0, 1)[0], job / "images" / "00-a.png")
    (job / "log.txt").write_text("log"), (job / "command.json").write_text("[]")
    card = server.share.parent / "README.md"
    if not card.exists():
        card.write_text("<!-- share-diffusers model card -->")
    refused = [server.share, card, saved, *(server.outputs / "jobs").rglob("*.png"), *(server.outputs / "jobs").rglob("log.txt"),
               *(server.outputs / "jobs").rglob("command.json"), *(server.outputs / "exports").rglob("*")]
    for path in refused:
        assert http_status(route + str(path)) in (403, 404), path
        assert http_status(route + str(path.relative_to(server.tmp))) in (403, 404), path  # relative to the app's folder


def test_stopping_the_server_stops_its_learn_job_and_keeps_the_file(server, client):
    """Last: SIGTERM to the app while a concept is being learned leaves no process behind and the file as it was."""
    before = server.share.read_bytes()
    client.predict([handle_file(str(p)) for p in training_images(2)], "interrupted", free_trigger(client, "ntrpt"),
                   PROMPT, 2000, api_name="/learn")
    status = wait_for(lambda: (s := learn_status(client))["pid"] and s, 60, "the learn job to start")
    time.sleep(2)  # the job is importing torch & co. (model loading or training: the same for this check)
    left = server.stop()
    assert not left, f"processes left behind: {left}"
    with pytest.raises(ProcessLookupError):
        os.kill(status["pid"], 0)
    assert server.share.read_bytes() == before
