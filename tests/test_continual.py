"""benchmarks/continual.py end to end in its --quick mode (2 concepts, 10 steps): every method runs,
the outputs are written, a stopped run continues where it was, a finished one grows to more concepts, and runs of different settings
refuse to combine or continue."""

import argparse
import json
import shutil

import numpy as np
import pytest

import share_lab
from benchmarks import continual, fold_loras
from share_diffusers import read_share
from share_lab import world


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    return out, continual.main(["--quick", "--out", str(out)])


def test_quick_run_writes_every_method_and_its_outputs(quick_run):
    out, summary = quick_run
    assert {p.name for p in out.iterdir()} >= {"continual.json", "continual.md", "continual.png", "continual-curves.png"}
    assert json.loads((out / "continual.json").read_text())["methods"].keys() == set(continual.METHODS)
    for name, r in summary["methods"].items():
        R = np.array(r["R"], dtype=float)
        assert R.shape == (2, 2), name
        filled = R[-1] if name == "joint" else R[np.tril_indices(2)]
        assert np.isfinite(filled).all(), name
        assert len(r["identity"]) == 2 and all(0 <= x <= 1 for x in r["identity"]), name
        assert np.array(r["discriminative"]["confusion"]).sum() == 2 * 2, name  # 2 concepts x 2 images
    share, lora = summary["methods"]["share"], summary["methods"]["lora"]
    assert lora["bytes_per_concept"] / share["bytes_per_concept"] >= 50
    assert abs(share["forgetting"]) < 1e-3  # two rank-1 concepts fit in k <= 16: lossless merges
    assert np.isfinite(share["all_active_score"])
    states = [read_share(out / "share" / "history" / f"after-{i:03d}.safetensors")[0] for i in (1, 2)]  # Share's state after each concept
    assert [s.names for s in states] == [summary["concepts"][:1], summary["concepts"]]
    # two rank-1 concepts in k <= 16: the last merge moved nothing, so the same identity when learned and at the end
    assert share["discriminative_when_learned"]["confusion"] == share["discriminative"]["confusion"]
    assert share["identity_forgetting"] == 0
    assert "within their 95% sampling interval at 2 images" in (out / "continual.md").read_text()


def test_a_stopped_run_continues_where_it_was(quick_run, tmp_path, monkeypatch):
    """Stopped while learning the second concept: the restarted run learns only the second, from
    the first one's checkpoint, and gets the uninterrupted run's numbers."""
    _, whole = quick_run
    args = ["--quick", "--methods", "naive", "ortho", "--identity_concepts", "0", "--images", "0"]
    for method in ("naive", "ortho"):
        learn = continual.LEARNERS[method].learn

        def stop_at_the_second(self, i, concept, learn=learn):
            if i == 1:
                raise KeyboardInterrupt
            learn(self, i, concept)

        monkeypatch.setattr(continual.LEARNERS[method], "learn", stop_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            continual.main(["--quick", "--methods", method, *args[4:], "--out", str(tmp_path / "stopped")])
        monkeypatch.undo()
        assert len(json.loads((tmp_path / "stopped" / method / "progress.json").read_text())["R_loss"]) == 1
    resumed = continual.main([*args, "--out", str(tmp_path / "stopped")])
    for method in ("naive", "ortho"):
        np.testing.assert_allclose(*(np.array(run["methods"][method]["R_loss"], dtype=float) for run in (resumed, whole)),
                                   rtol=1e-6, err_msg=method)
    with pytest.raises(SystemExit, match="other settings"):
        continual.main([*args, "--seed", "1", "--out", str(tmp_path / "stopped")])


def test_a_finished_run_grows_to_more_concepts(quick_run, tmp_path):
    """A 1-concept run continued with a second concept folder: it learns only the new concept and
    gets the 2-concept run's numbers; its final metrics are kept; other orders are refused."""
    _, whole = quick_run
    first, second = (tmp_path / "first", tmp_path / "second")
    for folder, concept in zip((first, second), world.list_concepts(share_lab.CONCEPTS)[:2]):
        shutil.copytree(concept.path, folder / concept.name)
    quick = ["--methods", "naive", "--steps", "10", "--lr", "lora=1e-3", "--heldout_images", "4", "--images", "0",
             "--identity_concepts", "0", "--drift_prompts", "2", "--sample_steps", "4", "--out", str(tmp_path / "run")]
    continual.main(["--concepts", "1", "--concepts_dir", str(first), *quick])
    grown = continual.main(["--concepts", "2", "--concepts_dir", str(first), str(second), *quick])
    np.testing.assert_allclose(np.array(grown["methods"]["naive"]["R_loss"], dtype=float),
                               np.array(whole["methods"]["naive"]["R_loss"], dtype=float), rtol=1e-6)
    progress = json.loads((tmp_path / "run" / "naive" / "progress.json").read_text())
    assert list(progress["final_at"]) == ["1"] and len(progress["wall_s"]) == 2
    with pytest.raises(SystemExit, match="other settings"):
        continual.main(["--concepts", "2", "--concepts_dir", str(second), str(first), *quick])
    with pytest.raises(SystemExit, match="found more than once"):
        continual.main(["--concepts", "2", "--concepts_dir", str(first), str(first), *quick])


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


def test_curves_of_several_runs_go_in_one_plot(quick_run, tmp_path):
    out, summary = quick_run
    runs = continual.main(["--curves", f"{out}:share=Share, k ≤ 16", f"{out / 'continual.json'}:naive", "--out", str(tmp_path)])
    assert list(runs) == ["Share, k ≤ 16", f"{out / 'continual.json'}:naive"]
    assert runs["Share, k ≤ 16"]["curves"] == summary["methods"]["share"]["curves"]
    assert (tmp_path / "continual-curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no method 'bogus'"):
        continual.main(["--curves", f"{out}:bogus", "--out", str(tmp_path)])


def test_scores_use_the_stored_references_or_else_the_runs_independent_loras():
    summary = {"base_losses": [1.0, 1.0], "stored_reference_losses": [0.5, None],
               "methods": {"lora": {"R_loss": [[0.8, None], [0.8, 0.6]]}, "naive": {"R_loss": [[0.8, None], [0.9, 0.6]]}}}
    scored = continual.scored(json.loads(json.dumps(summary)))["methods"]
    assert np.diag(scored["lora"]["R"]) == pytest.approx([1.0, 1.0])  # a concept lacks a reference: the run's LoRAs
    assert scored["naive"]["R"][1] == pytest.approx([0.5, 1.0])
    assert scored["naive"]["forgetting"] == pytest.approx(0.5)
    summary["stored_reference_losses"] = [0.5, 0.5]
    assert continual.scored(summary)["methods"]["lora"]["R"][1] == pytest.approx([0.4, 0.8])


def test_references_come_from_several_runs_finished_or_not(tmp_path):
    """--references RUN ...: a finished run's continual.json or a run folder (its LoRAs' progress so far); a concept
    no reference run has yet stays None (this run's raw losses are kept, and scored when the command runs again)."""
    concepts = world.list_concepts(share_lab.CONCEPTS)[:3]
    names = [c.name for c in concepts]
    finished = tmp_path / "finished.json"
    finished.write_text(json.dumps({"concepts": names[:1], "methods": {"lora": {"R_loss": [[0.25]]}}}))
    going = tmp_path / "going"
    (going / "lora").mkdir(parents=True)
    (going / "lora" / "progress.json").write_text(json.dumps({"settings": {"concepts": names[1:]}, "R_loss": [[0.5, None]]}))
    for c in concepts:  # the shipped concepts' own stored references are set aside for this test
        c.metadata.pop("evaluation", None)
    assert continual.reference_losses(concepts, [str(finished), str(going)]) == [0.25, 0.5, None]
    with pytest.raises(SystemExit, match="has no independent-LoRA"):
        continual.reference_losses(concepts, [str(tmp_path)])


def test_fold_loras_keeps_every_lora_when_k_holds_them_all(quick_run, tmp_path):
    """Two rank-4 LoRAs fit exactly in k = 8 directions (retention 1, no error); k = 2 cannot hold them."""
    out, quick_summary = quick_run
    summary = fold_loras.main([str(out), "--ks", "2", "8", "--out", str(tmp_path)])
    exact, squeezed = summary["results"][8], summary["results"][2]
    assert max(exact["reconstruction_error"]) < 1e-5
    assert exact["retention"] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert min(squeezed["reconstruction_error"]) > 0.1
    assert summary["recommended_k"] == 8
    # exact at k = 8: the same losses, so the same identity as the LoRAs, on the concepts the run tested
    assert exact["identity"]["confusion"] == quick_summary["methods"]["lora"]["discriminative"]["confusion"]
    assert exact["identity_retention"] == 1
    assert (tmp_path / "fold_loras.md").read_text().count("× smaller") == 2
    assert not list(tmp_path.glob("folded-*"))  # the folded files (and their locks) are removed


def test_the_guidance_benchmark_measures_each_concept_at_each_scale(tmp_path):
    """benchmarks/guidance.py on one concept: an identity rate of its n images per scale, and their mean."""
    from benchmarks import guidance

    concept = world.list_concepts(share_lab.CONCEPTS)[0]
    shutil.copytree(concept.path, tmp_path / "concepts" / concept.name)
    summary = guidance.main(["--concepts", str(tmp_path / "concepts"), "--scales", "1", "5", "--images", "4",
                             "--out", str(tmp_path / "guidance.json")])
    assert json.loads((tmp_path / "guidance.json").read_text()) == summary
    rates = summary["per_concept"][concept.name]
    assert set(rates) == {"1.0", "5.0"} and all(r * 4 == int(r * 4) and 0 <= r <= 1 for r in rates.values())
    assert summary["mean_identity"] == rates


def test_the_recipe_benchmark_trains_each_recipe_once_and_resumes(tmp_path, monkeypatch):
    """benchmarks/recipe.py: one row per recipe and concept, written as it goes; a re-run trains nothing
    that is already there, and a malformed recipe is refused naming the layer groups."""
    from benchmarks import recipe

    assert recipe.parse_recipe("8:attn+conv:200:1e-3") == {
        "rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], "steps": 200, "lr": 1e-3,
        "lr_scheduler": "constant"}
    assert recipe.parse_recipe("4:attn:800:3e-3:cosine")["lr_scheduler"] == "cosine"
    for bad in ("4:attn:400", "4:mlp:400:3e-3", "four:attn:400:3e-3", "4:attn:400:3e-3:sometimes", "4:attn:400:3e-3:cosine:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="RANK:LAYERS:STEPS:LR"):
            recipe.parse_recipe(bad)
    concept = world.list_concepts(share_lab.CONCEPTS)[0]
    shutil.copytree(concept.path, tmp_path / "concepts" / concept.name)
    argv = ["--concepts", str(tmp_path / "concepts"), "--recipes", "2:attn:2:1e-3", "2:attn+conv:2:1e-3",
            "--scales", "5", "--images", "2", "--out", str(tmp_path / "recipes.json")]
    summary = recipe.main(argv)
    assert json.loads((tmp_path / "recipes.json").read_text()) == summary
    for text in ("2:attn:2:1e-3", "2:attn+conv:2:1e-3"):
        rate = summary["per_recipe"][text]["per_concept"][concept.name]["5.0"]
        assert rate in (0, 0.5, 1) and summary["per_recipe"][text]["mean_identity"] == {"5.0": rate}
    monkeypatch.setattr(recipe, "train_lora_baseline", lambda *a, **k: pytest.fail("trained again"))
    assert recipe.main(argv)["per_recipe"] == summary["per_recipe"]
