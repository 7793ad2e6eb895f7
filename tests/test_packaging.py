"""What `pip install .` gives: the library and the web UI, not the lab; it works outside the checkout."""

import os
import shutil
import subprocess
import sys

import share_lab

USE = """
import share_diffusers, sys
from pathlib import Path
assert Path(share_diffusers.__file__).is_relative_to(sys.argv[1]), share_diffusers.__file__
import diffusers, torch
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[2])
pipe.load_share(sys.argv[3])
pipe.set_share_concepts(pipe.share_concepts[0].name)
print("ok", len(pipe.share_concepts))
"""


def test_a_non_editable_install_works_from_another_folder(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"  # a copy: setuptools writes build/ into the source tree
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "share_diffusers", "app"):
        copy = shutil.copytree if (share_lab.ROOT / part).is_dir() else shutil.copy
        copy(share_lab.ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    packages = {p.name for p in target.iterdir()}
    assert {"share_diffusers", "app"} <= packages and "share_lab" not in packages and "tests" not in packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", USE, str(target), str(share_lab.TINY_BASE), str(share_lab.DEMO_SHARE)],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]
    studio = subprocess.run([sys.executable, str(target / "bin" / "share-studio"), "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert studio.returncode == 0 and "--share" in studio.stdout, studio.stderr[-3000:]
