"""Learn jobs: ``train/learn_concept.py`` in a subprocess, watched through its progress file.

The job copies the validated uploads into its own folder and starts the training script in its
own process group (so Cancel kills the script and everything it started, and nothing else). The
script keeps ``progress.json`` up to date, writes ``run/preview.png`` every few steps, and replaces
the Share file atomically only at the very end, so a cancelled or failed job leaves the file
exactly as it was. When the process exits, the studio reloads the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from share_diffusers.io import file_token

from .files import ROOT, file_signature
from .validation import CheckedImage, safe_filename

FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def preview_every(steps: int) -> int:
    """About six previews per run (each costs one small generation in the training process)."""
    return max(2, math.ceil(steps / 6))


class LearnJob:
    def __init__(self, studio, name: str, trigger: str, caption: str, steps: int, images: list[CheckedImage],
                 extra_args: list[str] | tuple = ()):
        self.studio = studio
        self.name, self.trigger, self.caption, self.steps = name, trigger, caption, steps
        self.images = images
        self.extra_args = [str(a) for a in extra_args]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = studio.outputs / "jobs" / f"{stamp}-{secrets.token_hex(2)}-{safe_filename(name)}"
        self.run_dir = self.dir / "run"
        self.progress_file = self.dir / "progress.json"
        self.log_file = self.dir / "log.txt"
        self.proc: subprocess.Popen | None = None
        self.started = self.finished = None
        self.cancel_requested = False
        self.final: dict | None = None  # state, message, report once the process has exited
        self._done = threading.Event()
        self._progress: dict = {}
        self._first_step: tuple[int, float] | None = None  # (step, time) when training was first seen

    # -- life cycle -------------------------------------------------------------------------------

    def command(self) -> list[str]:
        s = self.studio
        return [
            s.python or sys.executable, str(s.train_script),
            "--pretrained_model_name_or_path", str(s.base.resolve()),
            "--instance_data_dir", str(self.dir / "images"),
            "--instance_prompt", self.caption,
            "--concept_name", self.name, "--trigger", self.trigger,
            "--share_path", str(s.share_path.resolve()),
            "--output_dir", str(self.run_dir),
            "--max_train_steps", str(self.steps),
            "--checkpointing_steps", str(self.steps + 1),
            "--report_to", "none",
            "--progress_file", str(self.progress_file),
            "--validation_steps", str(preview_every(self.steps)),
            "--num_validation_images", "1",
            *self.extra_args,
        ]

    def start(self) -> None:
        images_dir = self.dir / "images"
        images_dir.mkdir(parents=True)
        for i, image in enumerate(self.images):
            from PIL import Image

            with Image.open(image.path) as im:
                suffix = FORMAT_SUFFIX.get(im.format, image.path.suffix.lower())
            shutil.copyfile(image.path, images_dir / f"{i:02d}-{safe_filename(Path(image.name).stem)}{suffix}")
        self.signature_before = file_signature(self.studio.share_path)
        self.sha_before = file_token(self.studio.share_path) if self.signature_before else None
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **self.studio.train_env)
        if self.studio.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "true"
        cmd = self.command()
        (self.dir / "command.json").write_text(json.dumps(cmd, indent=1))
        with open(self.log_file, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, process_group=0)
        self.started = time.time()
        threading.Thread(target=self._monitor, name=f"learn-{self.name}", daemon=True).start()

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self, wait: float = 10.0) -> str:
        """Kill the job's process group (SIGTERM, then SIGKILL); the Share file stays as it was."""
        if not self.running:
            return self.view()["message"] or "The job is not running."
        self.cancel_requested = True
        self._signal(signal.SIGTERM)
        if not self._done.wait(wait):
            self._signal(signal.SIGKILL)
            self._done.wait(10)
        return self.view()["message"]

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _monitor(self) -> None:
        rc = self.proc.wait()
        # the script may have left children in its group (dataloader workers); none must outlive it
        self._signal(signal.SIGKILL)
        progress = self._read_progress()
        share = self.studio.share_path
        changed = file_signature(share) != self.signature_before
        if rc == 0 and progress.get("status") == "done":
            final = {"state": "done", "report": progress.get("report"),
                     "message": f"Learned {self.name!r} in {self._elapsed():.0f} s and merged it into {share.name}; "
                                "it is in the concept picker now."}
        elif self.cancel_requested:
            if not changed:
                final = {"state": "cancelled", "message": f"Cancelled: {share.name} is exactly as it was "
                         f"({'not created' if self.sha_before is None else 'SHA-256 ' + self.sha_before[:12] + '…, unchanged'})."}
            else:
                final = {"state": "done", "report": progress.get("report"),
                         "message": f"The cancel came too late: the job had already written {share.name} "
                                    f"(with {self.name!r}) when it was stopped."}
        else:
            final = {"state": "failed", "message": f"Learning {self.name!r} failed (exit code {rc}): {self._error()}"
                     + ("" if not changed else f" {share.name} was changed.")}
        self.final = final
        try:
            self.studio.on_job_finished(self)
        finally:
            self.finished = time.time()
            self._done.set()

    # -- reading the job's state ------------------------------------------------------------------

    def _read_progress(self) -> dict:
        try:
            self._progress = json.loads(self.progress_file.read_text())
        except (FileNotFoundError, ValueError):
            pass  # not written yet (the script is loading the model), or being replaced right now
        return self._progress

    def _elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def _error(self) -> str:
        """Why the job failed: the script writes it into the progress file; else the log's last lines."""
        error = self._read_progress().get("error")
        if error:
            return error
        try:
            lines = [line.strip() for line in re.split(r"[\r\n]+", self.log_file.read_text(errors="replace")) if line.strip()]
        except FileNotFoundError:
            return "no log."
        return " / ".join(lines[-3:]) or "no output."

    def view(self) -> dict:
        progress = self._read_progress()
        if self._done.is_set():
            state = self.final["state"]
        else:
            state = progress.get("status") or "starting"
            if state == "done":  # the script is exiting; "done" once the studio has loaded the new file
                state = "merging"
            if self.cancel_requested:
                state = "cancelling"
        preview = None
        for candidate in (self.run_dir / "preview.png", self.run_dir / "validation_0.png"):
            if candidate.is_file():
                preview = candidate
        final = self.final or {}
        step, max_steps = int(progress.get("step") or 0), int(progress.get("max_steps") or self.steps)
        eta = None
        if state == "training" and step:
            if self._first_step is None:
                self._first_step = (step, time.time())
            done, since = step - self._first_step[0], time.time() - self._first_step[1]
            if done > 0:
                eta = round(since / done * (max_steps - step), 1)
        return {
            "state": state, "name": self.name, "trigger": self.trigger, "caption": self.caption,
            "step": step, "max_steps": max_steps, "loss": progress.get("loss"), "elapsed": round(self._elapsed(), 1),
            "eta": eta,
            "preview": str(preview) if preview else None,
            "preview_mtime": preview.stat().st_mtime_ns if preview else None,
            "report": final.get("report") or progress.get("report"), "message": final.get("message"),
            "job_dir": str(self.dir), "pid": self.proc.pid if self.proc else None,
        }
