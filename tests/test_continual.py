"""benchmarks/continual.py end to end in its --quick mode (2 concepts, 10 steps): every method runs,
the outputs are written, and runs of different settings refuse to combine."""

import json

import numpy as np
import pytest

from benchmarks import continual


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    return out, continual.main(["--quick", "--out", str(out)])


def test_quick_run_writes_every_method_and_its_outputs(quick_run):
    out, summary = quick_run
    assert {p.name for p in out.iterdir()} >= {"continual.json", "continual.md", "continual.png"}
    assert json.loads((out / "continual.json").read_text())["methods"].keys() == set(continual.METHODS)
    for name, r in summary["methods"].items():
        R = np.array(r["R"], dtype=float)
        assert R.shape == (2, 2), name
        filled = R[-1] if name == "joint" else R[np.tril_indices(2)]
        assert np.isfinite(filled).all(), name
        assert len(r["identity"]) == 2 and all(0 <= x <= 1 for x in r["identity"]), name
    share, lora = summary["methods"]["share"], summary["methods"]["lora"]
    assert lora["bytes_per_concept"] / share["bytes_per_concept"] >= 50
    assert abs(share["forgetting"]) < 1e-3  # two rank-1 concepts fit in k <= 16: lossless merges
    assert "within their 95% sampling interval at 2 images" in (out / "continual.md").read_text()


def test_runs_of_different_settings_do_not_combine(quick_run, tmp_path):
    out, summary = quick_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "continual.json").write_text(json.dumps(dict(summary, steps=summary["steps"] + 1), default=float))
    with pytest.raises(SystemExit, match="differ in steps"):
        continual.main(["--combine", str(out), str(other), "--out", str(tmp_path / "all")])


def test_compare_reports_per_concept_identity_gaps(quick_run, capsys):
    out, summary = quick_run
    continual.main(["--compare", f"{out}:share", f"{out / 'continual.json'}:lora"])  # a run's folder or its JSON
    share, lora = (np.array(summary["methods"][m]["identity"]) for m in ("share", "lora"))
    printed = capsys.readouterr().out
    assert f"identity accuracy {100 * (share - lora).mean():+.0f} points" in printed
    assert "of 2 within 5 points" in printed
    with pytest.raises(SystemExit, match="no method 'bogus'"):
        continual.main(["--compare", f"{out}:share", f"{out}:bogus"])
