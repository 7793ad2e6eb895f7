"""`accelerate launch train/learn_concept.py` on the shipped tiny base: sequence, resume, 2 processes,
bad input, crashes. Short runs (a few steps each); what is checked is mechanics, not quality."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import share_diffusers  # noqa: F401
from share_diffusers import read_share, share_to_lora
from share_diffusers.lora import read_lora
from share_diffusers.targets import pipeline_shapes

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "assets" / "tiny-base"
CONCEPTS = ROOT / "assets" / "concepts"
SCRIPT = ROOT / "train" / "learn_concept.py"
FAST = ["--max_train_steps", "4", "--train_batch_size", "2", "--num_validation_images", "1", "--num_heldout_images", "2",
        "--report_to", "none"]


def launch(*args, processes=1, check=True, timeout=300, cwd=None, env=None, **popen):
    """``accelerate launch`` the training script on CPU, one thread per process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           "--pretrained_model_name_or_path", str(BASE), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1") | (env or {})  # never the network
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, **popen)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and result.returncode:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-3000:])
    return result


def concept(i):
    return sorted(CONCEPTS.glob("*/concept.json"))[i].parent


def learn(tmp, index, share, *extra, **kw):
    folder = concept(index)
    return launch("--instance_data_dir", folder / "train", "--share_path", share, "--output_dir", tmp / f"run{index}", *FAST, *extra, **kw)


def test_a_second_concept_changes_the_first_only_by_re_projection(tmp_path):
    """Also: no absolute path of this machine in the file or the card, and a held-out folder named by the
    file is read only with --heldout_from_file, where a bad one is skipped (it used to fail after training)."""
    share = tmp_path / "share.safetensors"
    shutil.copytree(concept(0) / "heldout", tmp_path / "heldout0")
    learn(tmp_path, 0, share, "--heldout_data_dir", "heldout0", cwd=tmp_path)  # relative: stored as given
    first, header = read_share(share)
    assert header["concepts"][0]["heldout_data_dir"] == "heldout0"
    (tmp_path / "heldout0" / "broken.png").write_text("not an image")
    result = learn(tmp_path, 1, share, "--heldout_from_file", cwd=tmp_path)
    assert "skipping" in result.stdout + result.stderr and "broken.png" in result.stdout + result.stderr
    second, header = read_share(share)
    assert header["config"]["base_model"] == "assets/tiny-base"  # given as an absolute path inside the repository
    card = (tmp_path / "README.md").read_text()
    assert 'from_pretrained("assets/tiny-base")' in card
    for text in (json.dumps(header), card):
        assert str(ROOT) not in text and str(tmp_path) not in text
    a, b = first.names[0], second.names[1]
    assert second.names == [a, b]
    assert header["concepts"][1]["trigger"] == json.loads((concept(1) / "concept.json").read_text())["trigger"]
    num = den = 0.0
    for name, layer in second.layers.items():
        before = first.delta(name, {a: 1.0}).double()
        U, V = layer.U.double(), layer.V.double()
        projected = U @ U.T @ before @ V @ V.T  # re-projection onto the merged basis: all that may change
        torch.testing.assert_close(second.delta(name, {a: 1.0}).double(), projected, atol=1e-5, rtol=1e-4)
        num += ((before - projected) ** 2).sum()
        den += (before**2).sum()
    assert second.concepts[0]["merge_errors"][-1] == pytest.approx((num / den).sqrt().item(), abs=1e-4)
    assert "merge err" in result.stdout and a in result.stdout and b in result.stdout
    assert json.loads((tmp_path / "run1" / "report.json").read_text())["finetune_after_merge_steps"] == 1  # default: a quarter of 4 steps
    assert (tmp_path / "README.md").read_text().count("|") > 10  # the model card lists both concepts


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path):
    args = ["--max_train_steps", "6", "--checkpointing_steps", "4", "--train_batch_size", "2", "--random_flip",
            "--report_to", "none", "--num_validation_images", "1", "--num_heldout_images", "2"]
    folder = concept(2) / "train"
    launch("--instance_data_dir", folder, "--share_path", tmp_path / "full.safetensors", "--output_dir", tmp_path / "full", *args)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")  # mid-epoch (3 batches per epoch)
    result = launch("--instance_data_dir", folder, "--share_path", tmp_path / "resumed.safetensors", "--output_dir", tmp_path / "resumed",
                    "--resume_from_checkpoint", "latest", *args)
    assert "Resuming from" in result.stdout
    full, _ = read_share(tmp_path / "full.safetensors")
    resumed, _ = read_share(tmp_path / "resumed.safetensors")
    name = full.names[0]
    for layer in full.layers:
        torch.testing.assert_close(resumed.delta(layer, {name: 1}), full.delta(layer, {name: 1}), atol=1e-6, rtol=1e-5)


def test_two_processes_write_one_valid_file(tmp_path):
    share = tmp_path / "share.safetensors"
    result = learn(tmp_path, 3, share, processes=2)
    state, _ = read_share(share)
    assert state.names == [concept(3).name]
    assert result.stdout.count("Wrote ") == 1  # only the main process writes


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit greyscale to 255: a 16-bit PNG used to train as pure white."""
    import numpy as np
    from PIL import Image

    from share_diffusers.training import read_instance_images

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    (example,) = read_instance_images(tmp_path, "a photo")
    pixels = np.asarray(example.image)
    assert example.image.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
    assert abs(pixels.mean() - 127.5) < 2


def test_compress_loras_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline

    from share_diffusers.lora import write_lora

    pipe = StableDiffusionPipeline.from_pretrained(BASE, local_files_only=True)
    shapes = pipeline_shapes(pipe, ["unet"])
    truth = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        factors = {l: (torch.randn(n, 2, generator=g) * 0.1, torch.randn(d, 2, generator=g) * 0.1) for l, (n, d) in shapes.items()}
        write_lora(factors, tmp_path / "loras" / f"lora{i}.safetensors")
        truth.append(factors)
    out = subprocess.run([sys.executable, ROOT / "train" / "compress_loras.py", tmp_path / "loras", "--output", tmp_path / "s.safetensors",
                          "--basis_rank", "6"], capture_output=True, text=True, check=True).stdout
    assert "lora0" in out and "smaller" in out
    for i, factors in enumerate(truth):
        share_to_lora(tmp_path / "s.safetensors", f"lora{i}", tmp_path / f"back{i}.safetensors")
        for layer, (B, A) in read_lora(tmp_path / f"back{i}.safetensors").items():
            torch.testing.assert_close(B @ A.T, factors[layer][0] @ factors[layer][1].T, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def learned_once(tmp_path_factory):
    """One concept learned into a Share file, once for this module (a run costs most of a minute)."""
    tmp = tmp_path_factory.mktemp("learned")
    learn(tmp, 4, tmp / "share.safetensors")
    return tmp / "share.safetensors"


@pytest.fixture
def existing_share(tmp_path, learned_once):
    """A private copy of that Share file, and its bytes, to prove failures leave it untouched."""
    share = tmp_path / "share.safetensors"
    shutil.copyfile(learned_once, share)
    return share, share.read_bytes()


def test_bad_inputs_are_clear_errors_and_leave_the_share_file_untouched(tmp_path, existing_share, monkeypatch):
    share, original = existing_share
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(concept(5) / "train", broken)
    (broken / "notes.png").write_text("this is not an image")
    (broken / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    from share_lab.tiny_pipelines import random_share, tiny_sd

    random_share(tiny_sd(), tmp_path / "other.safetensors")
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    first = sorted((concept(5) / "train").glob("*.png"))[0]
    shutil.copy(first, one), shutil.copy(first.with_suffix(".txt"), one)
    for i in range(200):
        shutil.copy(first, many / f"{i:03d}.png"), shutil.copy(first.with_suffix(".txt"), many / f"{i:03d}.txt")
    c5 = ["--instance_data_dir", concept(5) / "train"]
    # checked before any model loads: run in this process (a launch costs ~12 s); the same main() and progress file
    before_models = [
        (["--instance_data_dir", tmp_path / "empty"], "No images in"),
        (["--instance_data_dir", broken], "Unreadable image files.*bad.jpg.*notes.png"),
        ([*c5, "--concept_name", "../../x"], r"contains '\.\.'"),
        ([*c5, "--concept_name", "a/b"], "path or control characters"),
        ([*c5, "--concept_name", "<b>x</b>"], "characters that are not allowed"),
        ([*c5, "--trigger", "two words"], "one word"),
        (["--instance_data_dir", one], "has 1 image: a concept is learned from 3–20 images"),
        (["--instance_data_dir", many], "has 200 images: a concept is learned from 3–20 images"),
    ]
    # found with the models loaded or during training: through `accelerate launch`, as a user runs it
    launched = [
        (["--instance_data_dir", concept(4) / "train"], "already has a concept named.*--overwrite_concept"),
        ([*c5, "--share_path", tmp_path / "other.safetensors"], "another base model"),
        ([*c5, "--learning_rate", "1e30"], "loss became (nan|inf).*not touched"),
    ]
    script = _script(monkeypatch)
    for args, message, through_launcher in [(*case, False) for case in before_models] + [(*case, True) for case in launched]:
        if "--share_path" not in args:
            args = args + ["--share_path", share]
        progress = tmp_path / "progress.json"
        progress.unlink(missing_ok=True)
        args = [*args, "--output_dir", tmp_path / "bad", "--progress_file", progress, *FAST]
        if through_launcher:
            result = launch(*args, check=False)
            assert result.returncode != 0, args
            said = result.stdout + result.stderr
        else:
            with pytest.raises(SystemExit) as error:
                script.main(script.parse_args(["--pretrained_model_name_or_path", str(BASE), *map(str, args)]))
            said = str(error.value)
        assert re.search(message, said, re.S), (message, said[-2000:])
        assert share.read_bytes() == original
        failure = json.loads(progress.read_text())  # what the web UI shows: the failure travels in the progress file
        assert failure["status"] == "failed" and re.search(message, failure["error"], re.S), failure
    # --overwrite_concept replaces it
    learn(tmp_path, 4, share, "--overwrite_concept")
    state, _ = read_share(share)
    assert state.names == [concept(4).name]


def test_killed_during_training_leaves_the_previous_file_loadable(tmp_path, existing_share):
    share, original = existing_share
    proc = learn(tmp_path, 5, share, "--max_train_steps", "100000", "--checkpointing_steps", "2", processes=1, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "run5").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert share.read_bytes() == original
    read_share(share)


def trainers_of(run_dir: Path) -> list[int]:
    """Processes whose command line names ``run_dir`` (the launcher and the trainer it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_only_the_launcher_stops_the_trainer(tmp_path, existing_share):
    """SIGKILL to `accelerate launch` alone (not its group): the trainer exits with it and never writes the file."""
    share, original = existing_share
    run_dir = tmp_path / "run5"
    proc = learn(tmp_path, 5, share, "--max_train_steps", "60", "--checkpointing_steps", "2", start_new_session=True)
    deadline = time.time() + 180
    while not list(run_dir.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.5)
    trainers = [pid for pid in trainers_of(run_dir) if pid != proc.pid]
    assert trainers, "the trainer did not start"
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while trainers_of(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    left = trainers_of(run_dir)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the trainer outlived its launcher"
    time.sleep(1)
    assert share.read_bytes() == original


def test_killed_while_writing_leaves_the_previous_file_loadable(tmp_path, existing_share):
    """A process that dies in the middle of writing the new file (after half of it is on disk)."""
    share, original = existing_share
    code = f"""
import os, safetensors.torch as st
from share_diffusers import read_share, save_share
import share_diffusers.io as io
state, _ = read_share({str(share)!r})
def dying_save(tensors, path, metadata=None):
    st.save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os._exit(9)
io.save_file = dying_save
save_share(state, {str(share)!r})
"""
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 9
    assert share.read_bytes() == original
    read_share(share)


def test_a_share_file_keeps_its_basis_settings_unless_rebased(tmp_path):
    """A file made with --basis_rank 3 is continued at 3 when the flag is left out, and a contradicting
    flag is refused before training, naming both values (the file is left as it was)."""
    share = tmp_path / "share.safetensors"
    learn(tmp_path, 0, share, "--basis_rank", "3", "--num_extra_directions", "3")
    assert read_share(share)[1]["config"]["basis_rank"] == 3
    before = share.read_bytes()
    refused = learn(tmp_path, 1, share, "--basis_rank", "8", check=False)
    assert refused.returncode != 0
    assert re.search(r"--basis_rank 8 \(the file has 3\).*--rebase", refused.stdout + refused.stderr, re.S)
    assert share.read_bytes() == before
    learn(tmp_path, 1, share, "--rank", "2")  # --rank: the DreamBooth scripts' name for the coefficient rank
    state, header = read_share(share)
    assert header["config"]["basis_rank"] == 3 and header["config"]["num_extra_directions"] == 3
    assert header["config"]["coef_rank"] == 2
    assert max(layer.k for layer in state.layers.values()) <= 3


def test_two_concurrent_runs_on_one_file_keep_both_concepts(tmp_path, existing_share):
    """Both runs read the same file; whichever writes second merges into what the first wrote."""
    share, _ = existing_share
    runs = [learn(tmp_path, i, share, "--max_train_steps", "8", start_new_session=True) for i in (6, 7)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    state, _ = read_share(share)
    assert sorted(state.names) == sorted([concept(4).name, concept(6).name, concept(7).name])
    assert any("changed while training" in out for out in outputs)  # the second writer noticed, and merged


def test_a_write_that_fails_after_training_keeps_the_concept(tmp_path, existing_share):
    """Disk full at the final write: the Share file is untouched and the trained concept is saved beside the run."""
    share, original = existing_share
    code = f"""
import errno, runpy, sys
import share_diffusers.io as io
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
io.save_file = full
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
    args = ["--pretrained_model_name_or_path", BASE, "--instance_data_dir", concept(5) / "train", "--share_path", share,
            "--output_dir", tmp_path / "run5", *FAST]
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert re.search(r"could not write .*No space left.*kept as a LoRA file.*unsaved_concept.safetensors", result.stderr, re.S), result.stderr[-2000:]
    assert share.read_bytes() == original
    lora = read_lora(tmp_path / "run5" / "unsaved_concept.safetensors")
    assert lora and all(B.abs().sum() > 0 for B, _ in lora.values())


# ----------------------------------------------------------------------------- Hub and the DreamBooth flags


def test_a_hub_base_and_tokenizer_with_pre_computed_embeddings_learn_the_same_concept(tmp_path, learned_once):
    """Before: "not a local Diffusers pipeline folder". A Hub id (from a local Hub cache, HF_HUB_OFFLINE=1), a Hub
    tokenizer and --pre_compute_text_embeddings give the concept the local run learned; --validation_images gives
    one image-to-image result per image (on the tiny base, strength 0.75 keeps little of the start image's colour)."""
    from PIL import Image

    from share_lab.tiny_pipelines import fake_hub_repo

    share = learned_once  # the local run, same concept, flags and seed
    cache = tmp_path / "hub"
    fake_hub_repo(cache, "tiny/base", {".": BASE})
    fake_hub_repo(cache, "tiny/tokenizer", {".": BASE / "tokenizer"}, revision="main")
    starts = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"start{i}.png")
        starts.append(tmp_path / f"start{i}.png")
    hub_share = tmp_path / "hub.safetensors"
    result = learn(tmp_path, 4, hub_share, "--pretrained_model_name_or_path", "tiny/base", "--tokenizer_name", "tiny/tokenizer",
                   "--pre_compute_text_embeddings", "--validation_images", *starts, "--output_dir", tmp_path / "hubrun",
                   env={"HF_HUB_CACHE": str(cache)})
    assert "--pre_compute_text_embeddings: " in result.stdout
    local, _ = read_share(share)
    hub, header = read_share(hub_share)
    assert header["config"]["base_model"] == "tiny/base"  # the Hub id, not the cache path
    assert str(cache) not in (tmp_path / "README.md").read_text()
    name = concept(4).name
    for layer in local.layers:
        torch.testing.assert_close(hub.delta(layer, {name: 1}), local.delta(layer, {name: 1}), atol=1e-6, rtol=1e-5)
    images = sorted((tmp_path / "hubrun").glob("validation_*.png"))
    assert [p.name for p in images] == ["validation_0.png", "validation_1.png"]  # one per --validation_images, not 1
    text_to_image = np.asarray(Image.open(learned_once.parent / "run4" / "validation_0.png"), dtype=float)  # same prompt and seed
    assert np.abs(np.asarray(Image.open(images[0]), dtype=float) - text_to_image).max() > 10  # image-to-image, not the text-only call


def _script(monkeypatch):
    """train/learn_concept.py as a module (a script, not a package: loaded from its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("learn_concept_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_flag_errors_are_clear_and_come_before_any_model_loads(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    script = _script(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    (tmp_path / "junk.png").write_text("not an image")
    common = ["--instance_data_dir", str(concept(0) / "train"), "--share_path", str(tmp_path / "s.safetensors"),
              "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    for flags, message in [
        (["--use_8bit_adam"], "--use_8bit_adam needs bitsandbytes.*pip install bitsandbytes"),
        (["--num_heldout_images", "-1"], "--num_heldout_images must be 0 or more, got -1"),
        (["--finetune_after_merge_steps", "-2"], "--finetune_after_merge_steps must be 0 or more, got -2"),
        (["--push_to_hub"], "--push_to_hub needs the network, but HF_HUB_OFFLINE is set"),
        (["--pre_compute_text_embeddings", "--train_text_encoder"], "cannot be combined with --train_text_encoder"),
        (["--pre_compute_text_embeddings", "--train_t5"], "cannot be combined with --train_t5"),
        (["--validation_images", str(tmp_path / "junk.png")], "--validation_images: .*junk.png is not a readable image"),
        (["--pretrained_model_name_or_path", "nobody/absent"], "'nobody/absent'.*HF_HUB_OFFLINE is set.*not in the local Hub cache"),
    ]:
        with pytest.raises(SystemExit, match=message):
            script.main(script.parse_args(common + flags))
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_train_t5_on_a_base_without_a_t5_encoder_is_refused_before_training(tmp_path, monkeypatch):
    script = _script(monkeypatch)
    with pytest.raises(SystemExit, match="--train_t5: this base model has no T5 text encoder"):
        script.main(script.parse_args(["--instance_data_dir", str(concept(0) / "train"), "--share_path", str(tmp_path / "s.safetensors"),
                                       "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--train_t5"]))
    assert not (tmp_path / "s.safetensors").exists()


def test_push_to_hub_uploads_the_share_file_card_report_and_images_in_one_commit(tmp_path, monkeypatch):
    """With a fake Hub (no network): the repo id is --hub_model_id (else the output folder's name), the Share file
    goes up as share.safetensors so that pipe.load_share(repo_id) finds it, with the token given."""
    import huggingface_hub

    script = _script(monkeypatch)
    calls = []

    def create_repo(repo_id, exist_ok=False, token=None):
        calls.append(("create", repo_id, exist_ok, token))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/me/{repo_id.split('/')[-1]}")

    def upload_folder(repo_id, folder_path, token=None, commit_message=None):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload", repo_id, files, token, commit_message))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    from share_lab.tiny_pipelines import random_share, tiny_sd

    out = tmp_path / "my-run"
    out.mkdir()
    share = tmp_path / "concepts.safetensors"
    random_share(tiny_sd(), share, names=("blob",))
    for path, data in [(tmp_path / "README.md", b"someone's own README"), (out / "report.json", b"{}"),
                       (out / "validation_0.png", b"png0"), (out / "checkpoint-4.bin", b"not uploaded")]:
        path.write_bytes(data)
    args = script.parse_args(["--share_path", str(share), "--output_dir", str(out), "--push_to_hub", "--hub_token", "tok",
                              "--concept_name", "blob"])
    assert script.push_to_hub(args, {}) == "me/my-run"
    (create, upload) = calls
    assert create == ("create", "my-run", True, "tok")
    assert upload[:2] == ("upload", "me/my-run") and upload[3] == "tok" and "'blob'" in upload[4]
    uploaded = upload[2]
    assert set(uploaded) == {"share.safetensors", "README.md", "report.json", "validation_0.png"}
    assert uploaded["share.safetensors"] == share.read_bytes() and uploaded["validation_0.png"] == b"png0"
    card = uploaded["README.md"].decode()  # a card for the repo, not the README.md that happened to be beside the file
    assert 'pipe.load_share("me/my-run")' in card and "| blob |" in card
    calls.clear()
    args.hub_model_id = "org/concepts"
    script.push_to_hub(args, {"lora_path": str(share)})  # --no_merge: the LoRA file instead
    assert calls[0][1] == "org/concepts" and set(calls[1][2]) == {"pytorch_lora_weights.safetensors", "validation_0.png"}


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_the_post_merge_fine_tune_moves_only_the_new_concepts_denoiser_coefficients(kind, monkeypatch):
    """--finetune_after_merge_steps: the merged basis and every earlier concept stay bit-identical; only
    the new concept's UNet / transformer coefficients train (SD3 and Flux with their flow-matching
    objective); the pipeline is left as it was (no trainer attached: the same held-out loss)."""
    from argparse import Namespace
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from share_diffusers import ShareState
    from share_diffusers.training import heldout_loss, read_instance_images
    from share_lab.tiny_pipelines import tiny_flux, tiny_sd3

    script = _script(monkeypatch)
    pipe = {"sd": lambda: StableDiffusionPipeline.from_pretrained(BASE, local_files_only=True), "sd3": tiny_sd3, "flux": tiny_flux}[kind]()
    pipe.set_progress_bar_config(disable=True)
    denoiser = "unet" if kind == "sd" else "transformer"
    g = torch.Generator().manual_seed(0)

    def concept_factors():
        return {name: (0.05 * torch.randn(n, 1, generator=g), 0.05 * torch.randn(d, 1, generator=g))
                for name, (n, d) in pipeline_shapes(pipe).items()}

    old, _ = ShareState.empty(pipeline_shapes(pipe)).merge({"old": concept_factors()})
    merged, _ = old.merge({"new": concept_factors()})
    before = {name: (layer.U.clone(), layer.V.clone(), layer.B.clone(), layer.A.clone()) for name, layer in merged.layers.items()}
    examples = read_instance_images(concept(0) / "train", "a photo of sks")
    resolution = None if kind == "sd" else 32  # the tiny transformers' size
    if resolution:
        examples = [replace(e, image=e.image.resize((resolution, resolution))) for e in examples]
    images, captions = [e.image for e in examples[:2]], [e.caption for e in examples[:2]]
    reference = heldout_loss(pipe, images, captions)

    args = Namespace(concept_name="new", seed=0, learning_rate=1e-2, train_batch_size=2, max_grad_norm=1.0,
                     resolution=resolution, max_sequence_length=16, guidance_scale=3.5, weighting_scheme=None)
    tuned = script.finetune_after_merge(args, pipe, merged, examples, steps=3)

    untrained = set()
    for name, layer in tuned.layers.items():
        U, V, B, A = before[name]
        assert torch.equal(layer.U, U) and torch.equal(layer.V, V), name  # the basis is frozen
        assert torch.equal(layer.B[0], B[0]) and torch.equal(layer.A[0], A[0]), name  # so is the earlier concept
        change = (layer.B[1] @ layer.A[1].T - B[1] @ A[1].T).abs().max().item()
        if not name.startswith(f"{denoiser}."):
            assert change == 0, f"{name}: the text encoder is not fine-tuned after the merge, yet changed by {change}"
        elif change == 0:
            untrained.add(name)
    # SD3's last block never reads its context queries: that layer gets no gradient
    assert untrained == ({"transformer.transformer_blocks.1.attn.add_q_proj"} if kind == "sd3" else set())
    assert heldout_loss(pipe, images, captions) == reference


def test_target_modules_adapt_the_layers_asked_and_the_file_keeps_them(tmp_path):
    """--target_modules / --text_encoder_target_modules as PEFT's: proj_in (a 1×1 convolution in this UNet),
    the resnets' 3×3 conv1/conv2 (as LoCon), feed-forward and text-encoder MLP layers are learned; the file
    stores the setting, so the next run continues with it; a layer Share cannot adapt, or a name that
    matches nothing, is refused before training."""
    share = tmp_path / "share.safetensors"
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    learn(tmp_path, 0, share, "--target_modules", *unet_targets, "--train_text_encoder",
          "--text_encoder_target_modules", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    state, header = read_share(share)
    leaves = {name.rsplit(".", 1)[-1] for name in state.layers}
    assert {"proj_in", "proj_out", "fc1", "fc2", "2", "conv1", "conv2"} <= leaves
    assert header["config"]["target_modules"] == unet_targets
    assert header["config"]["conv_layers"] and all(l.endswith(("proj_in", "proj_out")) for l in header["config"]["conv_layers"])
    kernels = header["config"]["conv_kernels"]
    assert kernels and all(l.endswith(("conv1", "conv2")) and k == [3, 3] for l, k in kernels.items())
    conv = next(iter(kernels))
    assert state.layers[conv].k > 0 and state.delta(conv, {state.names[0]: 1.0}).abs().max() > 0
    ff = next(n for n in state.layers if n.endswith("ff.net.2"))
    assert state.layers[ff].k > 0 and state.delta(ff, {state.names[0]: 1.0}).abs().max() > 0

    learn(tmp_path, 1, share, "--train_text_encoder")  # the flags left out: the file's targets
    state2, header2 = read_share(share)
    assert set(state2.layers) == set(state.layers) and header2["config"]["target_modules"] == unet_targets
    assert state2.delta(ff, {state2.names[1]: 1.0}).abs().max() > 0

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=5.0)
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_share(share)
    pipe.set_share_concepts(state2.names[0])
    shown = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.fuse_share()
    fused = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(shown - base).max() > 0 and abs(fused - shown).max() < 1e-4

    before = share.read_bytes()
    for flags, message in ((["--target_modules", "norm1"], r"norm1 \(a GroupNorm\).*Share adapts Linear and Conv2d"),
                           (["--target_modules", "nothing_here"], r"matches no layer of the unet")):
        refused = learn(tmp_path, 2, share, *flags, check=False)
        assert refused.returncode != 0 and re.search(message, refused.stdout + refused.stderr), refused.stderr[-2000:]
    assert share.read_bytes() == before
