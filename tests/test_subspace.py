"""The math core against dense linear algebra: delta, training init, merge, errors."""

import pytest
import torch

from share_diffusers.subspace import MERGE_HISTORY, LayerShare, NewConcept, ShareState, balance, share_delta
from share_lab.tiny_pipelines import synthetic_state

torch.manual_seed(0)


def orthonormal(n, k):
    return torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))[0]


def random_state(shapes, num_concepts, k, p, seed=0):
    """A state with an arbitrary orthonormal basis and random concepts in it (float64)."""
    return synthetic_state(shapes, num_concepts, k=k, p=p, seed=seed, scale=1.0, dtype=torch.float64)


def test_share_delta_matches_dense_for_one_core_and_per_sample_cores():
    n, d, k = 12, 10, 4
    U, V = orthonormal(n, k), orthonormal(d, k)
    cores = torch.randn(3, k, k, dtype=torch.float64)
    x = torch.randn(5, 7, d, dtype=torch.float64)
    dense = U @ cores @ V.mT  # (3, n, d)
    torch.testing.assert_close(share_delta(x, U, V, cores[:1]), x @ dense[0].mT)
    index = torch.tensor([2, 0, 1, 1, 2])
    expected = torch.stack([x[i] @ dense[index[i]].mT for i in range(5)])
    torch.testing.assert_close(share_delta(x, U, V, cores, index), expected)


def test_balance_keeps_the_product_and_equalises_the_factors():
    B, A = torch.randn(4, 6, 2, dtype=torch.float64), torch.randn(4, 6, 2, dtype=torch.float64) * 10
    Bb, Ab = balance(B, A)
    torch.testing.assert_close(Bb @ Ab.mT, B @ A.mT)
    torch.testing.assert_close(Bb.mT @ Bb, Ab.mT @ Ab)  # both equal S, diagonal


def test_new_concept_starts_at_zero_and_every_tensor_learns_within_two_steps():
    state = random_state({"a": (16, 12), "b": (8, 8)}, num_concepts=2, k=3, p=2)
    state = ShareState({n: LayerShare(*(t.float() for t in (l.U, l.V, l.B, l.A))) for n, l in state.layers.items()}, state.concepts)
    concept = NewConcept(state, p=2, phi=2)
    x = torch.randn(4, 12)
    layer = concept.layers[0]
    assert torch.count_nonzero(layer(x)) == 0  # ΔW = 0 at step 0
    opt = torch.optim.Adam(concept.parameters(), lr=1e-2)
    moved = {name: torch.zeros((), dtype=torch.bool) for name, _ in concept.named_parameters()}
    target = torch.randn(4, 16)
    for _ in range(2):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean() + ((concept.layers[1](torch.randn(3, 8)) - 1) ** 2).mean()
        loss.backward()
        for name, prm in concept.named_parameters():
            moved[name] |= prm.grad is not None and bool(torch.count_nonzero(prm.grad))
        opt.step()
    assert all(moved.values()), [n for n, m in moved.items() if not m]


def test_first_concept_needs_temporary_directions():
    with pytest.raises(ValueError, match="num_extra_directions"):
        NewConcept(ShareState.empty({"a": (8, 8)}), p=1, phi=0)


def brute_force_basis(deltas, k, normalize=True):
    """Top-k left singular vectors of [ΔW_1 … ΔW_C] and of [ΔW_1ᵀ … ΔW_Cᵀ]."""
    ws = [D / D.norm() if normalize else D for D in deltas]
    Uo = torch.linalg.svd(torch.cat(ws, 1))[0][:, :k]
    Vo = torch.linalg.svd(torch.cat([w.mT for w in ws], 1))[0][:, :k]
    return Uo, Vo


@pytest.mark.parametrize("normalize", [True, False])
def test_merge_agrees_with_brute_force_svd_of_the_dense_stack(normalize):
    state = random_state({"l": (40, 30)}, num_concepts=4, k=6, p=2)
    g = torch.Generator().manual_seed(1)
    newB, newA = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    merged, report = state.merge({"new": {"l": (newB, newA)}}, k_max=5, normalize=normalize)
    old = [state.delta("l", {f"c{i}": 1.0}) for i in range(4)]
    Uo, Vo = brute_force_basis(old + [newB @ newA.mT], 5, normalize)
    layer = merged.layers["l"]
    assert layer.k == 5
    torch.testing.assert_close(layer.U @ layer.U.mT, Uo @ Uo.mT, atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.V @ layer.V.mT, Vo @ Vo.mT, atol=1e-4, rtol=0)
    # every concept is re-projected onto the new subspace: ΔŴ = Πu ΔW Πv
    for i, D in enumerate(old + [newB @ newA.mT]):
        name = merged.names[i]
        projected = Uo @ Uo.mT @ D @ Vo @ Vo.mT
        torch.testing.assert_close(merged.delta("l", {name: 1.0}), projected, atol=1e-4 * D.norm().item(), rtol=0)


def test_reported_merge_error_equals_the_measured_one():
    state = random_state({"l1": (24, 20), "l2": (16, 24)}, num_concepts=5, k=8, p=2)
    newB = {l: torch.randn(n, 2, dtype=torch.float64) for l, (n, d) in state.shapes.items()}
    newA = {l: torch.randn(d, 2, dtype=torch.float64) for l, (n, d) in state.shapes.items()}
    merged, report = state.merge({"new": {l: (newB[l], newA[l]) for l in newB}}, k_max=6)
    for i, name in enumerate(merged.names):
        num = den = 0.0
        for l in state.layers:
            before = state.delta(l, {name: 1.0}) if name != "new" else newB[l] @ newA[l].mT
            err = (before - merged.delta(l, {name: 1.0})).norm() ** 2
            num, den = num + err, den + before.norm() ** 2
            assert report[name]["layers"][l] == pytest.approx((err / before.norm() ** 2).sqrt().item(), abs=1e-7)
        assert report[name]["overall"] == pytest.approx((num / den).sqrt().item(), abs=1e-7)
        assert report[name]["overall"] > 1e-3  # the cap really truncated something
        assert merged.concepts[i]["merge_errors"][-1] == pytest.approx(report[name]["overall"], abs=1e-7)


def test_new_concept_inside_the_old_span_leaves_old_concepts_unchanged():
    state = random_state({"l": (32, 28)}, num_concepts=3, k=6, p=2)
    layer = state.layers["l"]
    inside = (layer.U @ torch.randn(6, 2, dtype=torch.float64), layer.V @ torch.randn(6, 2, dtype=torch.float64))
    merged, report = state.merge({"new": {"l": inside}}, k_max=6)
    for name in state.names:
        torch.testing.assert_close(merged.delta("l", {name: 1.0}), state.delta("l", {name: 1.0}), atol=1e-10, rtol=0)
        assert report[name]["overall"] < 1e-7
    torch.testing.assert_close(merged.delta("l", {"new": 1.0}), inside[0] @ inside[1].mT, atol=1e-10, rtol=0)


def test_basis_grows_from_empty_and_energy_threshold_picks_smallest_k():
    state = ShareState.empty({"l": (20, 20)}, dtype=torch.float64)
    # a concept with singular values 10, 1, 0.1: 90% energy needs 1 direction, 99.9% needs 2
    P, Q = orthonormal(20, 3), orthonormal(20, 3)
    B, A = P @ torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64)), Q
    s1, _ = state.merge({"x": {"l": (B, A)}}, k_max=8)
    assert s1.layers["l"].k == 3
    s2, _ = state.merge({"x": {"l": (B, A)}}, k_max=8, energy=0.9)
    assert s2.layers["l"].k == 1
    s3, _ = state.merge({"x": {"l": (B, A)}}, k_max=8, energy=0.9999)
    assert s3.layers["l"].k == 2
    s4, _ = state.merge({"x": {"l": (B, A)}}, k_max=2)
    assert s4.layers["l"].k == 2


def test_a_budget_puts_the_directions_where_the_concepts_need_them():
    """Concept x needs 3 directions in layer a and 1 in b: 4 in all hold it exactly, as a uniform
    k = 2 (also 4 in all) cannot; fewer than that go to a, where the larger part of x is."""
    state = ShareState.empty({"a": (20, 20), "b": (20, 20)}, dtype=torch.float64)
    x = {"a": (orthonormal(20, 3) * 2.0, orthonormal(20, 3)), "b": (orthonormal(20, 1), orthonormal(20, 1))}
    exact, report = state.merge({"x": x}, k_max=8, budget=4)
    assert {name: layer.k for name, layer in exact.layers.items()} == {"a": 3, "b": 1}
    assert report["x"]["overall"] < 1e-7
    uniform, report = state.merge({"x": x}, k_max=2)
    assert report["x"]["overall"] > 0.3
    tight, _ = state.merge({"x": x}, k_max=8, budget=2)
    assert {name: layer.k for name, layer in tight.layers.items()} == {"a": 2, "b": 0}
    capped, _ = state.merge({"x": x}, k_max=2, budget=4)
    assert {name: layer.k for name, layer in capped.layers.items()} == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="budget of directions or an energy threshold"):
        state.merge({"x": x}, budget=4, energy=0.9)


def test_a_budgeted_merge_reports_its_measured_error_and_removes_under_the_same_budget():
    state = random_state({"l1": (24, 20), "l2": (16, 24), "l3": (12, 12)}, num_concepts=6, k=6, p=1)
    merged, report = state.merge(budget=9, k_max=6)
    assert sum(layer.k for layer in merged.layers.values()) == 9
    for name in state.names:
        num = sum((state.delta(l, {name: 1.0}) - merged.delta(l, {name: 1.0})).norm() ** 2 for l in state.layers)
        den = sum(state.delta(l, {name: 1.0}).norm() ** 2 for l in state.layers)
        assert report[name]["overall"] == pytest.approx((num / den).sqrt().item(), abs=1e-7)
    rest, _ = merged.remove("c0", k_max=6, budget=5)
    assert sum(layer.k for layer in rest.layers.values()) == 5 and "c0" not in rest.names


def test_mixing_is_the_weighted_sum_of_deltas_and_remove_refits():
    state = random_state({"l": (16, 16)}, num_concepts=3, k=5, p=1)
    mix = state.delta("l", {"c0": 0.5, "c2": -1.5})
    torch.testing.assert_close(mix, 0.5 * state.delta("l", {"c0": 1}) - 1.5 * state.delta("l", {"c2": 1}))
    rest, report = state.remove("c1", k_max=5)
    assert rest.names == ["c0", "c2"] and rest.layers["l"].k == 2  # two rank-1 concepts need 2 directions
    for name in rest.names:
        torch.testing.assert_close(rest.delta("l", {name: 1}), state.delta("l", {name: 1}), atol=1e-10, rtol=0)
    with pytest.raises(KeyError, match="Unknown Share concept 'zz'"):
        state.weights({"zz": 1.0})


def test_the_merge_error_history_is_capped():
    """A concept keeps its last MERGE_HISTORY merge errors: the file's header must not grow with C²."""
    torch.manual_seed(0)
    state = ShareState.empty({"l": (6, 5)})
    for c in range(MERGE_HISTORY + 4):
        state, _ = state.merge({f"c{c}": {"l": (torch.randn(6, 1), torch.randn(5, 1))}}, k_max=3)
    assert len(state.concepts[0]["merge_errors"]) == MERGE_HISTORY
    assert len(state.concepts[-1]["merge_errors"]) == 1
