"""The mechanisms the systems benchmark (``python -m benchmarks.systems``) relies on, and its --quick run.

No timing assertions here: timings belong to the benchmark. These tests check the behaviour that
makes the timings possible (no recompilation, no model walk on a switch, linear merge work, the
in-place delta) and that the benchmark measures what it claims to.
"""

import json
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import share_diffusers  # noqa: F401
from benchmarks.systems import cli
from benchmarks.systems.harness import build_model, load_loras, make_pipeline, meta_shapes, peft_mixed_batch, unet_inputs
from benchmarks.systems.training import train_worker
from share_diffusers.io import save_share
from share_diffusers.subspace import LayerShare, NewConcept, ShareState, share_delta
from share_diffusers.targets import pipeline_shapes
from share_lab.tiny_pipelines import random_share, synthetic_state, tiny_sd


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small machine shared with other jobs, two threads that wait on
    each other make these tiny workloads many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_args(unet, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return torch.randn(batch, 4, size, size, generator=g), torch.tensor(10), torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)


# ----------------------------------------------------------------------------- the delta


@pytest.mark.parametrize("index", [None, torch.tensor([1, 0, 1])])
def test_in_place_delta_equals_the_out_of_place_one_with_gradients(index):
    g = torch.Generator().manual_seed(0)
    n, d, k = 12, 10, 4
    U, V = torch.linalg.qr(torch.randn(n, k, generator=g))[0], torch.linalg.qr(torch.randn(d, k, generator=g))[0]
    cores = torch.randn(2, k, k, generator=g)
    x = torch.randn(3, 5, d, generator=g, requires_grad=True)
    W = torch.randn(n, d, generator=g, requires_grad=True)
    expected = x @ W.mT + share_delta(x, U, V, cores, index)
    with torch.no_grad():  # inference: added in place, no temporary of the output's size
        y = x @ W.mT
        assert share_delta(x, U, V, cores, index, out=y) is y
        torch.testing.assert_close(y, expected.detach())
    got = share_delta(x, U, V, cores, index, out=x @ W.mT)  # under autograd: out of place
    torch.testing.assert_close(got, expected)
    (ge_x, ge_W), (gg_x, gg_W) = (torch.autograd.grad(y.square().sum(), (x, W)) for y in (expected, got))
    torch.testing.assert_close(gg_x, ge_x)
    torch.testing.assert_close(gg_W, ge_W)
    # an output that cannot be viewed flat, and one of another dtype (autocast), still get the delta
    out = (x @ W.mT).detach().transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(share_delta(x.detach(), U, V, cores, index, out=out), expected.detach())
    half = share_delta(x.detach(), U, V, cores, index, out=(x @ W.mT).detach().bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected.detach(), atol=0.1, rtol=0.02)


def test_training_forward_uses_rank_p_factors_and_equals_the_expanded_form():
    g = torch.Generator().manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(16, 4, generator=g))[0], torch.linalg.qr(torch.randn(12, 4, generator=g))[0]
    state = ShareState({"l": LayerShare(U, V, torch.randn(2, 4, 1, generator=g), torch.randn(2, 4, 1, generator=g))}, [{"name": "a"}, {"name": "b"}])
    layer = NewConcept(state, p=1, phi=2).layers[0]
    with torch.no_grad():
        layer.B.normal_()
        layer.B_tmp.normal_()
    x = torch.randn(3, 12)
    Ue, Ve, core = layer.expanded()
    torch.testing.assert_close(layer(x), share_delta(x, Ue, Ve, core[None]))
    with FlopCounterMode(display=False) as fc:
        layer(x)
    # the large products are p = 1 wide: 2·3·(12 + 16) for x Â and · B̂ᵀ, plus the tiny factor products
    assert fc.get_total_flops() <= 2 * 3 * (12 + 16) + 2 * 2 * (16 + 12) * (4 + 2)


# ----------------------------------------------------------------------------- switching


def test_a_switch_touches_only_the_selected_concepts_and_never_walks_the_model(tmp_path, monkeypatch):
    pipe = tiny_sd()
    shapes = pipeline_shapes(pipe)
    flops = {}
    for C in (3, 300):
        save_share(synthetic_state(shapes, C, k=8, p=1), tmp_path / f"s{C}.safetensors")
        pipe.load_share(tmp_path / f"s{C}.safetensors")
        walks = []
        for method in ("named_modules", "named_children"):
            original = getattr(torch.nn.Module, method)
            monkeypatch.setattr(torch.nn.Module, method, lambda self, *a, _f=original, _w=walks, **k: _w.append(1) or _f(self, *a, **k))
        with FlopCounterMode(display=False) as fc:
            pipe.set_share_concepts({"c1": 0.5, "c2": 0.5})
        monkeypatch.undo()
        assert walks == []  # checking for replaced processors must not traverse the UNet
        flops[C] = fc.get_total_flops()
        pipe.unload_share()
    assert flops[3] == flops[300] > 0  # the cost of a switch does not depend on how many concepts are loaded


def test_views_follow_dtype_changes_and_group_count_changes(tmp_path):
    pipe = tiny_sd()
    random_share(pipe, tmp_path / "s.safetensors", components=["unet"])
    pipe.load_share(tmp_path / "s.safetensors")
    x, t, e = unet_args(pipe.unet, 3)
    with torch.no_grad():
        pipe.set_share_concepts(["cat", "dog", "owl"])
        mixed = pipe.unet(x, t, e).sample
        pipe.set_share_concepts("dog")  # group count 3 -> 1: the cores buffer is replaced
        dog = pipe.unet(x, t, e).sample
        torch.testing.assert_close(dog[1], mixed[1], atol=1e-5, rtol=0)
        pipe.unet.to(torch.float64)  # new buffer tensors: the per-layer views must follow
        dog64 = pipe.unet(x.double(), t, e.double()).sample
    assert dog64.dtype == torch.float64
    torch.testing.assert_close(dog64.float(), dog, atol=1e-5, rtol=0)


def test_compiled_unet_is_not_recompiled_by_concept_switches(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = tiny_sd()
    names = [f"c{i}" for i in range(6)]
    random_share(pipe, tmp_path / "s.safetensors", names=names, p=1, components=["unet"])
    pipe.load_share(tmp_path / "s.safetensors")
    unet = pipe.unet
    x, t, e = unet_args(unet, 2)
    rng = random.Random(0)
    pipe.set_share_concepts("c0")
    unet.compile(backend="eager")  # Dynamo guards and recompiles the same with every backend
    try:
        with torch.no_grad():
            c0 = unet(x, t, e).sample
            graphs = counters["stats"]["unique_graphs"]
            for i in range(20):
                pipe.set_share_concepts(rng.choice(names) if i % 3 else {rng.choice(names): 0.5, rng.choice(names): -0.2})
                unet(x, t, e)
            assert counters["stats"]["unique_graphs"] == graphs
            pipe.set_share_concepts("c1")
            c1 = unet(x, t, e).sample
            assert (c1 - c0).abs().max() > 1e-4  # the switch reached the compiled graph
            with torch.compiler.set_stance("force_eager"):
                torch.testing.assert_close(unet(x, t, e).sample, c1)
            pipe.set_share_concepts(["c2", "c3"])  # the per-prompt path: one more graph, once
            unet(x, t, e)
            graphs = counters["stats"]["unique_graphs"]
            for _ in range(10):
                pipe.set_share_concepts([rng.choice(names), rng.choice(names + [None])])
                unet(x, t, e)
            assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- merge


def test_merge_work_grows_linearly_with_the_number_of_concepts():
    """Floating-point work of merging one concept into C concepts: no C² (or n·C) term."""
    shapes = {"a": (64, 48), "b": (40, 64)}
    flops = {}
    for C in (100, 400):
        state = synthetic_state(shapes, C, k=8, p=1)
        new = {"new": {l: (torch.randn(n, 1), torch.randn(d, 1)) for l, (n, d) in shapes.items()}}
        with FlopCounterMode(display=False) as fc:
            merged, report = state.merge(new, k_max=8)
        flops[C] = fc.get_total_flops()
        assert len(report) == C + 1 and merged.layers["a"].B.shape == (C + 1, 8, 1)
    assert flops[400] <= 4.2 * flops[100]


def test_merge_with_many_concepts_keeps_every_concept_exact_when_nothing_is_truncated():
    shapes = {"a": (24, 20)}
    state = synthetic_state(shapes, 500, k=6, p=1)
    layer = state.layers["a"]
    inside = (layer.U @ torch.randn(6, 1), layer.V @ torch.randn(6, 1))  # within the old span: k stays 6
    merged, report = state.merge({"new": {"a": inside}}, k_max=6)
    for name in random.Random(0).sample(state.names, 20):
        torch.testing.assert_close(merged.delta("a", {name: 1.0}), state.delta("a", {name: 1.0}), atol=1e-5, rtol=1e-4)
    assert max(r["overall"] for r in report.values()) < 1e-4


# ----------------------------------------------------------------------------- baselines and configs


def test_peft_mixed_batch_helper_equals_one_adapter_at_a_time():
    pipe = tiny_sd()
    shapes = pipeline_shapes(pipe)
    load_loras(pipe, shapes, ["l0", "l1", "l2"], 4, ("unet",))
    x, t, e = unet_args(pipe.unet, 3)
    with torch.no_grad(), peft_mixed_batch(pipe.unet, ["l0", "l1", "l2"]):
        mixed = pipe.unet(x, t, e).sample
    with torch.no_grad():
        for i in range(3):
            pipe.set_adapters(f"l{i}")
            torch.testing.assert_close(mixed[i : i + 1], pipe.unet(x[i : i + 1], t, e[i : i + 1]).sample, atol=1e-5, rtol=0)
        assert (mixed[0] - mixed[1]).abs().max() > 1e-4


def test_training_measurement_counts_adam_state_and_trainable_parameters():
    spec = dict(arch="tiny", device="cpu", dtype="fp32", batch=1, size=8, warmup=1, repeats=1, threads=None)
    lora = train_worker(dict(spec, variant="lora-r4"))
    share = train_worker(dict(spec, variant="share-phi2"))
    shapes = [s for name, s in meta_shapes("tiny").items() if name.startswith("unet.")]
    assert lora["trainable"] == sum(4 * (n + d) for n, d in shapes)
    assert share["trainable"] == sum(2 * min(16, n, d) + 2 * (n + d) + 2 * 2 for n, d in shapes)
    for r in (lora, share):
        assert r["optimizer_state_bytes"] == 2 * 4 * r["trainable"]  # AdamW: two fp32 moments per parameter


@pytest.mark.parametrize("arch, layers, params", [
    ("sd15", {"unet": 128, "text_encoder": 48}, {"unet": 859.52, "text_encoder": 123.06}),
    ("sdxl", {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}, {"unet": 2567.46, "text_encoder": 123.06, "text_encoder_2": 694.66}),
])
def test_kept_configs_are_the_public_architectures(arch, layers, params):
    shapes = meta_shapes(arch)
    for component, count in layers.items():
        assert sum(1 for n in shapes if n.startswith(component + ".")) == count
        model = build_model(arch, component, meta=True)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params[component], abs=0.01)


def test_sd15_unet_and_text_encoder_inject_share_and_train_one_step(tmp_path):
    pipe = make_pipeline("sd15")
    shapes = pipeline_shapes(pipe)
    assert len(shapes) == 176
    save_share(synthetic_state(shapes, 3), tmp_path / "s.safetensors")
    args, kw = unet_inputs(pipe.unet, 1, 8)  # 64 px: reduced resolution
    ids = torch.randint(0, 500, (1, 77))
    with torch.no_grad():
        base = pipe.unet(*args).sample
        pipe.load_share(tmp_path / "s.safetensors")  # validated against the real layer shapes
        pipe.set_share_concepts("c1")
        share = pipe.unet(*args).sample
        assert torch.isfinite(share).all() and (share - base).abs().max() > 0
    pipe.unload_share()

    from share_diffusers.training import attach_new_concept, detach_new_concept

    with torch.no_grad():
        before = pipe.unet(args[0], args[1], pipe.text_encoder(ids).last_hidden_state).sample
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    trainers = attach_new_concept(models, ShareState.empty(shapes), p=1, phi=2)  # the first concept: empty basis
    pred = pipe.unet(args[0], args[1], pipe.text_encoder(ids).last_hidden_state).sample
    assert torch.equal(pred, before)  # ΔW = 0 at step 0, in UNet and text encoder
    pred.square().mean().backward()
    for component, trainer in trainers.items():
        grads = [p.grad for n, p in trainer.named_parameters() if n.endswith(".B_tmp")]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), component  # ΔW = 0, yet B̃ learns at step 1
    detach_new_concept(models)
    assert not hasattr(pipe.unet, "share_adapter")


# ----------------------------------------------------------------------------- the benchmark itself


def test_quick_benchmark_runs_end_to_end(tmp_path):
    results = cli.main(["--quick", "--out", str(tmp_path)])
    for name in ("systems.json", "systems.md", "systems.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "systems.json").read_text())
    assert set(saved["sections"]) == set(cli.SECTIONS)
    by = {(t["section"], t["what"]): t for t in saved["targets"]}
    assert len(by) >= 14 and all({"value", "goal", "met"} <= set(t) for t in by.values())
    assert results["sections"]["compile"]["rows"][0]["new_graphs"] == 0
    assert results["sections"]["inference"]["mixed_rel_err"] < 1e-4  # the timed mixed batch is correct
    assert all(t["met"] for t in saved["targets"] if t["section"] == "archs")  # inject, train, merge, fuse, export work
    assert "| switch |" in (tmp_path / "systems.md").read_text()
    for arch in results["sections"]["transformers"]["results"].values():  # tiny Flux and SD3: the timed variants are right
        assert arch["unfuse_bit_exact"] and arch["mixed_rel_err"] < 1e-4
