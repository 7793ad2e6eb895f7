"""share-lab: the measurement lab of share-diffusers, not part of the installed library.

Why a second package: the procedural world, the quality metrics, the LoRA baselines and the tiny
test pipelines exist to *measure* Share, and they are tied to this checkout (its ``assets/``
folder). ``pip install share-diffusers`` gives the library only; ``scripts/setup.sh`` installs
this package too (editable, from ``lab/``), for ``train/``, ``benchmarks/`` and ``tests/``.

- `world`: the procedural world (base scenes, novel concepts, concept folders)
- `evaluation`: held-out score, identity classifier, analytic image checks, continual metrics
- `baselines`: the PEFT LoRA every Share figure is compared with
- `tiny_pipelines`: tiny SD / SDXL pipelines built from configs, offline, for tests and benchmarks
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: lab/share_lab/__init__.py
ASSETS = ROOT / "assets"
TINY_BASE = ASSETS / "tiny-base"  # the pretrained base pipeline (train/pretrain_tiny_base.py)
CONCEPTS = ASSETS / "concepts"  # the shipped concept folders (train/make_concepts.py)
CLASSIFIER = ASSETS / "classifier"  # the identity classifier (train/train_classifier.py)
DEMO_SHARE = ASSETS / "demo.share.safetensors"  # train/make_demo_share.py
