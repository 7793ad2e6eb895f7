"""The web UI's engine, without Gradio: one pipeline with every concept of one Share file resident.

`Studio` owns the pipeline and the Share file. It generates (a name, a ``{name: weight}`` mix, or one
selection per image of one batch), writes PNGs whose text chunks record what made them, runs learn
jobs (`jobs.LearnJob`, a subprocess running ``train/learn_concept.py``) and renames, deletes and
exports concepts. Every user mistake raises `UserError` with a message meant for the UI, before
anything is written.

Concurrency. The pipeline holds one selection at a time, so ``set_share_concepts`` and the
generation that uses it run under ``gen_lock``: requests never see each other's concepts. The
Share file is only ever replaced atomically (by the learn job or by rename/delete); before each
generation its ``stat`` signature is compared with the loaded one and the new version is loaded
under the same lock, so a request sees either the old file or the new one, never a mix. Writes to
the file (rename, delete, starting a learn job) are serialised by ``file_lock`` and refused while a
learn job runs, since the job would overwrite them when it writes its result.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from PIL import PngImagePlugin

import share_diffusers
from share_diffusers import ShareFileError, read_share, save_share, share_to_lora
from share_diffusers.card import write_model_card
from share_diffusers.config import stored_config

from .files import TRAIN_SCRIPT, Loaded, concept_table, file_signature, file_summary
from .jobs import LearnJob
from .validation import (
    MAX_BATCH,
    TRIGGER_PLACEHOLDER,
    UserError,
    check_concept_name,
    check_images,
    check_trigger,
    normalize_selection,
    safe_filename,
)


def describe(mix: dict[str, float] | None) -> str:
    if not mix:
        return "base model"
    return " + ".join(f"{n}" if w == 1 else f"{n} ×{w:g}" for n, w in mix.items())


def fill_triggers(template: str, mix: dict[str, float] | None, triggers: dict[str, str | None]) -> str:
    """Replace ``{trigger}`` by the triggers of the image's concepts (removed for the base model)."""
    if TRIGGER_PLACEHOLDER not in template:
        return template
    words = " ".join(triggers.get(n) or "" for n in (mix or {})).strip()
    text = template.replace(TRIGGER_PLACEHOLDER, words)
    return re.sub(r"\s{2,}", " ", text).strip()


# -- generation results -----------------------------------------------------------------------------


@dataclass
class Generated:
    paths: list[Path]
    captions: list[str]
    selections: list[dict | None]
    seeds: list[int]
    seconds: float
    info: str


SAMPLERS = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "PNDM": "PNDMScheduler",
}
DEFAULT_SAMPLER = "Default"


# -- the studio ---------------------------------------------------------------------------------------


class Studio:
    """One base pipeline + one Share file, shared by every request of the web UI."""

    def __init__(self, base, share_path, outputs, device: str = "cpu", dtype: torch.dtype | None = None,
                 python: str | None = None, train_script: Path = TRAIN_SCRIPT, train_env: dict | None = None,
                 note: str | None = None):
        from diffusers import DiffusionPipeline

        self.base = Path(base)
        self.share_path = Path(share_path)
        self.outputs = Path(outputs)
        self.device = str(device)
        self.note = note
        self.python = python
        self.train_script = Path(train_script)
        self.train_env = dict(train_env or {})
        if not (self.base / "model_index.json").is_file():
            raise UserError(f"{self.base} is not a Diffusers pipeline folder (no model_index.json); pass --base PATH.")
        dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.pipe = DiffusionPipeline.from_pretrained(self.base, dtype=dtype, local_files_only=True)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.default_scheduler = self.pipe.scheduler
        self._schedulers = {}
        vae_scale = getattr(self.pipe, "vae_scale_factor", 8)
        self.native_size = int(self.pipe.unet.config.sample_size * vae_scale)
        self.gen_lock = threading.RLock()
        self.file_lock = threading.RLock()
        self._save_lock = threading.Lock()
        self.loaded = Loaded()
        self.job = None  # the current or last LearnJob
        self.sync(strict=True)

    # -- the Share file -----------------------------------------------------------------------------

    def sync(self, strict: bool = False, block: bool = True) -> bool:
        """Load the Share file if it changed on disk since it was loaded; returns True if it did.

        A file that appeared, changed or vanished is picked up. If the new file cannot be loaded,
        the previous version stays in use and ``loaded.error`` says why (``strict``: raise instead).
        """
        if not self.gen_lock.acquire(blocking=block):
            return False
        try:
            signature = file_signature(self.share_path)
            current = self.loaded
            if signature == current.signature:
                return False
            if signature is None:
                share_diffusers.unload_share(self.pipe)
                self.loaded = Loaded(current.version + 1)
                return True
            try:
                for _ in range(5):  # a file replaced while we read it: read the new one
                    state, header = read_share(self.share_path)
                    sha = header["file_token"]  # the SHA-256 of the very bytes read
                    if file_signature(self.share_path) == signature:
                        break
                    signature = file_signature(self.share_path)
                loaded = bool(share_diffusers.get_list_share_adapters(self.pipe))
                share_diffusers.load_share(self.pipe, state, adapter_name="default_0", hotswap=loaded)  # replaces the file
            except (ShareFileError, FileNotFoundError, OSError) as e:
                if strict:
                    raise UserError(str(e)) from e
                self.loaded = Loaded(**{**current.__dict__, "signature": signature, "error": str(e)})
                return True
            self.loaded = Loaded(current.version + 1, signature, state, header, sha, signature[1])
            return True
        finally:
            self.gen_lock.release()

    def concepts(self) -> list[dict]:
        return concept_table(self.loaded)

    def summary(self) -> dict:
        return file_summary(self.loaded)

    # -- generation ---------------------------------------------------------------------------------

    def _scheduler(self, sampler: str | None):
        if not sampler or sampler == DEFAULT_SAMPLER or sampler.startswith(DEFAULT_SAMPLER + " "):
            return self.default_scheduler
        if sampler not in SAMPLERS:
            raise UserError(f"Unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
        if sampler not in self._schedulers:
            import diffusers

            cls = getattr(diffusers, SAMPLERS[sampler])
            self._schedulers[sampler] = cls.from_config(self.default_scheduler.config)
        return self._schedulers[sampler]

    def sampler_choices(self) -> list[str]:
        return [f"{DEFAULT_SAMPLER} ({type(self.default_scheduler).__name__})", *SAMPLERS]

    @staticmethod
    def _check_numbers(steps, guidance, width, height, batch, seed):
        def integer(value, what, lo, hi):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"{what} must be a number, got {value!r}.") from None
            if not math.isfinite(value) or value != int(value) or not lo <= value <= hi:
                raise UserError(f"{what} must be a whole number from {lo} to {hi}, got {value:g}.")
            return int(value)

        steps = integer(steps, "Steps", 1, 200)
        batch = integer(batch, "Batch size", 1, MAX_BATCH)
        width = integer(width, "Width", 8, 2048)
        height = integer(height, "Height", 8, 2048)
        if width % 8 or height % 8:
            raise UserError(f"Width and height must be multiples of 8, got {width}×{height}.")
        seed = integer(-1 if seed is None or seed == "" else seed, "Seed", -1, 2**32 - 1 - MAX_BATCH)
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise UserError(f"Guidance must be a number, got {guidance!r}.") from None
        if not (math.isfinite(guidance) and 0 <= guidance <= 50):
            raise UserError(f"Guidance must be between 0 and 50, got {guidance:g}.")
        return steps, guidance, width, height, batch, seed

    def generate(self, prompt: str, negative_prompt: str = "", selection=None, steps=20, guidance=5.0, seed=-1,
                 width=None, height=None, batch_size=1, sampler=None, per_image: bool | None = None) -> Generated:
        """Generate ``batch_size`` images; ``selection`` is one selection for all, or a list of one per image.

        ``{trigger}`` in the prompt becomes each image's trigger words. Images are saved as PNGs
        with the base, the Share file (path and SHA-256), the concepts and the settings in their text chunks.
        """
        prompt = "" if prompt is None else str(prompt)
        negative_prompt = "" if negative_prompt is None else str(negative_prompt)
        width, height = width or self.native_size, height or self.native_size
        steps, guidance, width, height, batch, seed = self._check_numbers(steps, guidance, width, height, batch_size, seed)
        if seed == -1:
            seed = secrets.randbelow(2**31)
        per_image = isinstance(selection, (list, tuple)) if per_image is None else per_image
        if per_image and not isinstance(selection, (list, tuple)):
            raise UserError("One concept per image needs a list with one selection per image.")
        if per_image and len(selection) != batch:
            raise UserError(f"One concept per image: got {len(selection)} selections for a batch of {batch}.")
        seeds = [seed + i for i in range(batch)]
        with self.gen_lock:
            reloaded = self.sync()
            loaded = self.loaded
            names, triggers = loaded.names, loaded.triggers
            mixes = [normalize_selection(s, names) for s in selection] if per_image else [normalize_selection(selection, names)] * batch
            prompts = [fill_triggers(prompt, m, triggers) for m in mixes]
            if loaded.state is not None:
                share_diffusers.set_share_concepts(self.pipe, list(mixes) if per_image else mixes[0])
            self.pipe.scheduler = self._scheduler(sampler)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    images = self.pipe(prompts, negative_prompt=[negative_prompt] * batch if negative_prompt else None,
                                       num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                       generator=generators).images
            finally:
                if loaded.state is not None:
                    share_diffusers.set_share_concepts(self.pipe, None)
                self.pipe.scheduler = self.default_scheduler
            seconds = time.perf_counter() - started
        sampler_name = type(self._scheduler(sampler)).__name__
        record = {
            "base": str(self.base.resolve()), "share_file": str(self.share_path.resolve()) if loaded.state is not None else None,
            "share_sha256": loaded.sha256, "share_version": loaded.version, "prompt_template": prompt,
            "negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance, "width": width, "height": height,
            "sampler": sampler_name, "batch_size": batch, "batch_selection": mixes if per_image else mixes[0],
            "per_image": bool(per_image), "software": f"share-diffusers {share_diffusers.__version__} web UI",
        }
        paths = self._save(images, prompts, mixes, seeds, record, triggers)
        captions = [describe(m) for m in mixes]  # seeds are on the info line and in each PNG
        notes = []
        if reloaded:
            notes.append(f"Loaded the new version of the Share file ({len(names)} concepts).")
        if loaded.error:
            notes.append(f"⚠ The Share file on disk could not be loaded, the previous version is used: {loaded.error}")
        missing = sorted({triggers.get(n) for m in mixes for n in (m or {}) if triggers.get(n)} -
                         {t for p in prompts for t in re.findall(r"\S+", p)})
        if missing:
            notes.append(f"Tip: the prompt does not contain the trigger{'s' * (len(missing) > 1)} {', '.join(missing)}; "
                         f"write it, or put {TRIGGER_PLACEHOLDER} where it belongs.")
        info = (f"{batch} image{'s' * (batch > 1)} in {seconds:.2f} s · seeds {seeds[0]}" + (f"–{seeds[-1]}" if batch > 1 else "")
                + f" · {steps} steps, {sampler_name}, guidance {guidance:g}, {width}×{height}")
        return Generated(paths, captions, list(mixes), seeds, seconds, "\n\n".join([info, *notes]))

    def _save(self, images, prompts, mixes, seeds, record, triggers) -> list[Path]:
        folder = self.outputs / "images" / datetime.now().strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        with self._save_lock:
            numbers = [int(p.name.split("-")[0]) for p in folder.glob("*.png") if p.name.split("-")[0].isdigit()]
            counter = max(numbers, default=-1) + 1
            for i, (image, prompt, mix, seed) in enumerate(zip(images, prompts, mixes, seeds)):
                meta = dict(record, prompt=prompt, seed=seed, batch_index=i, concepts=mix,
                            triggers={n: triggers.get(n) for n in (mix or {})})
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", a1111_parameters(meta))
                info.add_text("share_diffusers", json.dumps(meta))
                info.add_text("Software", record["software"])
                path = folder / f"{counter + i:05d}-{seed}.png"
                image.save(path, pnginfo=info)
                paths.append(path)
        return paths

    def warmup(self) -> float:
        """One tiny generation, so that the first user does not pay for lazy initialisation."""
        started = time.perf_counter()
        with self.gen_lock, torch.inference_mode():
            self.pipe("", num_inference_steps=2, width=self.native_size, height=self.native_size, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(0))
        return time.perf_counter() - started

    # -- managing concepts ----------------------------------------------------------------------------

    def _refuse_during_job(self, action: str) -> None:
        job = self.job
        if job is not None and job.running:
            view = job.view()
            where = f"step {view['step']}/{view['max_steps']}" if view.get("max_steps") else view["state"]
            raise UserError(f"Cannot {action} while the concept {job.name!r} is being learned ({where}): the learn "
                            "job will rewrite the Share file when it finishes and would undo it. Wait for it to "
                            "finish, or cancel it in the Learn tab.")

    def _writable_state(self):
        self.sync()
        loaded = self.loaded
        if loaded.error:
            raise UserError(f"The Share file on disk cannot be loaded, so it cannot be changed: {loaded.error}")
        if loaded.state is None:
            raise UserError(f"There is no Share file at {self.share_path} yet: learn a concept first.")
        return loaded

    def rename(self, old: str, new: str) -> str:
        with self.file_lock:
            self._refuse_during_job("rename a concept")
            loaded = self._writable_state()
            if old not in loaded.names:
                raise UserError(f"Pick the concept to rename; {old!r} is not in the Share file.")
            new = check_concept_name(new, [n for n in loaded.names if n != old], what="new name")
            if new == old:
                raise UserError(f"The concept is already called {old!r}.")
            state = loaded.state.rename(old, new)
            save_share(state, self.share_path, config=loaded.header.get("config"))
            write_model_card(self.share_path, state, loaded.header.get("config"))
            self.sync()
        return f"Renamed {old!r} to {new!r}."

    def delete(self, name: str) -> dict[str, float]:
        """Delete a concept and refit the basis to the others; returns their merge errors."""
        with self.file_lock:
            self._refuse_during_job("delete a concept")
            loaded = self._writable_state()
            if name not in loaded.names:
                raise UserError(f"Pick the concept to delete; {name!r} is not in the Share file.")
            state, report = loaded.state.remove(name, **stored_config(loaded.header).merge_kwargs())
            save_share(state, self.share_path, config=loaded.header.get("config"))
            write_model_card(self.share_path, state, loaded.header.get("config"))
            self.sync()
        return {n: r["overall"] for n, r in report.items()}

    def export_lora(self, name: str) -> Path:
        """One concept as a standard Diffusers LoRA file (``pipe.load_lora_weights`` loads it)."""
        with self.file_lock:
            loaded = self._writable_state()
            if name not in loaded.names:
                raise UserError(f"Pick the concept to export; {name!r} is not in the Share file.")
            out = self.outputs / "exports" / f"{safe_filename(name)}.safetensors"
            share_to_lora(self.share_path, name, out)
        return out

    # -- learning ---------------------------------------------------------------------------------------

    def start_learn(self, files, name, trigger, caption="a photo of {trigger}", steps=200, **train_args):
        """Validate everything, then start a learn job; raises `UserError` (nothing written) on bad input."""
        with self.file_lock:
            self._refuse_during_job("start another learn job")
            self.sync()
            loaded = self.loaded
            if loaded.error:
                raise UserError(f"The Share file on disk cannot be loaded, so nothing can be added to it: {loaded.error}")
            name = check_concept_name(name, loaded.names)
            trigger = check_trigger(trigger, {t: n for n, t in loaded.triggers.items() if t})
            caption = (caption or "").strip() or f"a photo of {TRIGGER_PLACEHOLDER}"
            if TRIGGER_PLACEHOLDER not in caption and trigger not in caption.split():
                raise UserError(f"The caption {caption!r} must contain the trigger ({TRIGGER_PLACEHOLDER} or {trigger!r}), "
                                "or the concept will not be tied to it.")
            caption = caption.replace(TRIGGER_PLACEHOLDER, trigger)
            try:
                steps = int(steps)
            except (TypeError, ValueError):
                raise UserError(f"Training steps must be a whole number, got {steps!r}.") from None
            if not 1 <= steps <= 20000:
                raise UserError(f"Training steps must be from 1 to 20000, got {steps}.")
            images = check_images(files)
            job = LearnJob(self, name=name, trigger=trigger, caption=caption, steps=steps, images=images, **train_args)
            try:
                job.start()
            except OSError as e:
                import shutil

                shutil.rmtree(job.dir, ignore_errors=True)
                raise UserError(f"Could not start the training process: {e}") from e
            self.job = job
        return job

    def cancel_learn(self) -> str:
        job = self.job
        if job is None or not job.running:
            return "No concept is being learned."
        return job.cancel()

    def job_view(self) -> dict:
        return self.job.view() if self.job is not None else {"state": "idle"}

    def on_job_finished(self, job) -> None:
        """Called by the job's monitor thread when the process has exited."""
        self.sync()

    def close(self) -> None:
        job = self.job
        if job is not None and job.running:
            job.cancel(wait=10)


def a1111_parameters(meta: dict) -> str:
    """The ``parameters`` text chunk in the AUTOMATIC1111 layout, so existing PNG-info tools read it."""
    fields = [
        ("Steps", meta["steps"]), ("Sampler", meta["sampler"]), ("CFG scale", f"{meta['guidance_scale']:g}"),
        ("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"), ("Model", Path(meta["base"]).name),
        ("Share file", Path(meta["share_file"]).name if meta.get("share_file") else "none"),
        ("Share sha256", (meta.get("share_sha256") or "")[:12]),
        ("Share concepts", ", ".join(f"{n}:{w:g}" for n, w in (meta.get("concepts") or {}).items()) or "none"),
        ("Version", meta["software"]),
    ]
    text = meta["prompt"]
    if meta.get("negative_prompt"):
        text += f"\nNegative prompt: {meta['negative_prompt']}"
    quote = lambda v: json.dumps(str(v)) if any(c in str(v) for c in ",:\n") else str(v)
    return text + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in fields)
