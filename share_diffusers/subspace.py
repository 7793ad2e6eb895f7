"""Share's mathematics, in plain torch: the shared subspace of one layer and of a whole model.

Notation (DESIGN.md §2). A linear layer ``y = W0 x`` has ``W0`` of shape ``n × d`` (out × in).
Its shared basis is ``U`` (n×k, output side) and ``V`` (d×k, input side), both with orthonormal
columns. A concept ``c`` is two coefficient matrices ``B_c``, ``A_c`` (k×p) and adds

    ΔW_c = U B_c A_cᵀ Vᵀ = U M_c Vᵀ,      M_c = B_c A_cᵀ  (the k×k "core").

A weighted mix of concepts is the sum of their cores, so one function, `share_delta`, serves
training, single concepts, mixes and per-sample selections, and `dense_delta` serves fusing.

Storage is layer-major: a `LayerShare` keeps the coefficients of all C concepts as ``(C, k, p)``
tensors, so merging, mixing and selection are batched tensor operations. Coefficients are kept
*balanced* (``B = P S½``, ``A = Q S½`` from the SVD of the core), a canonical form that fixes the
gauge freedom ``(B G, A G⁻ᵀ)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "share_delta",
    "dense_delta",
    "balance",
    "LayerShare",
    "MergeResult",
    "Refit",
    "Spectrum",
    "allocate",
    "ShareState",
    "NewConcept",
]


MERGE_HISTORY = 16  # merge errors kept per concept (the most recent)


# ----------------------------------------------------------------------------- the delta


def share_delta(
    x: Tensor, U: Tensor, V: Tensor, core: Tensor | None, index: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """``ΔW x`` for a batch of inputs ``x`` (batch, ..., d) → (batch, ..., n), never forming ΔW.

    ``core`` is ``(G, k, k)``: one core per selection group. ``index`` (batch,) gives each
    sample's group; ``None`` means every sample uses ``core[0]``. The two large products
    (``x V`` and ``· Uᵀ``) are shared by the whole batch; only the k×k step is per sample.
    ``core=None`` means ``ΔW = U Vᵀ`` (plain factors, as while training a new concept).

    With ``out`` (the layer's output ``W0 x``) the result is ``out`` plus the delta. At inference
    (nothing requires grad) the delta is added into ``out`` in place by one ``addmm``: no
    (batch, ..., n) temporary is allocated, and on a CPU that allocation, not the arithmetic, is
    most of an adapter's cost at this rank.
    """
    u = x @ V
    if core is None:
        v = u
    elif index is None:
        v = u @ core[0].mT
    else:
        v = (u.reshape(u.shape[0], -1, u.shape[-1]) @ core[index].mT).view_as(u)
    if out is None:
        return v @ U.mT
    if out.requires_grad or v.requires_grad or U.requires_grad or not out.is_contiguous():
        return out + v @ U.mT  # autograd gets a plain graph (in place, the backward was not bit-reproducible)
    if v.dtype != out.dtype or U.dtype != out.dtype:  # e.g. under autocast
        v, U = v.to(out.dtype), U.to(out.dtype)
    out.view(-1, out.shape[-1]).addmm_(v.reshape(-1, v.shape[-1]), U.mT)
    return out


def dense_delta(U: Tensor, V: Tensor, core: Tensor) -> Tensor:
    """The dense ``n × d`` matrix ``U core Vᵀ`` (for fusing into ``W0`` and for tests)."""
    return U @ core @ V.mT


def balance(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Canonical factors of ``B Aᵀ`` (batched over leading dims): ``B = P S½``, ``A = Q S½``.

    Uses thin QRs of the (k×p) factors and an SVD of the p×p middle, so it costs O(k p²).
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A)
    P, S, Qh = torch.linalg.svd(Rb @ Ra.mT)
    root = S.sqrt().unsqueeze(-2)
    return Qb @ P * root, Qa @ Qh.mT * root


# ----------------------------------------------------------------------------- one layer


@dataclass
class MergeResult:
    """What a merge did to one layer: the new layer and, per concept, ``‖ΔW‖²`` and ``‖ΔW − ΔŴ‖²``."""

    layer: LayerShare
    norm2: Tensor
    err2: Tensor


def _orth_complement(U: Tensor, X: Tensor, rtol: float = 1e-9) -> Tensor:
    """Orthonormal basis of the part of span(X) outside span(U) (U orthonormal)."""
    R = X - U @ (U.mT @ X)
    R = R - U @ (U.mT @ R)  # second pass keeps the result orthogonal to U in floating point
    if R.shape[1] == 0:
        return R
    Q, S, _ = torch.linalg.svd(R, full_matrices=False)
    return Q[:, S > rtol * max(S.max().item(), X.norm().item(), 1e-30)]


def _choose_k(eig: Tensor, available: int, k_max: int, energy: float | None) -> int:
    """Smallest k reaching ``energy`` of the spectrum (all of it if None), capped by ``k_max``."""
    eig = eig.clamp_min(0)
    total = eig.sum()
    if total <= 0:
        return 0
    rank = int((eig > eig[0] * 1e-12).sum())
    target = 1.0 - 1e-12 if energy is None else energy
    k = int((torch.cumsum(eig, 0) / total < target).sum()) + 1
    return max(0, min(k, rank, k_max, available))


@dataclass
class LayerShare:
    """The shared subspace of one ``n × d`` layer and every concept's coefficients in it.

    ``U`` (n×k), ``V`` (d×k); ``B``, ``A`` (C×k×p): concept ``c`` is ``B[c] A[c]ᵀ``. Concepts of
    smaller width p are zero-padded, which changes nothing.
    """

    U: Tensor
    V: Tensor
    B: Tensor
    A: Tensor

    @classmethod
    def empty(cls, n: int, d: int, p: int = 1, dtype: torch.dtype = torch.float32) -> LayerShare:
        z = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
        return cls(z(n, 0), z(d, 0), z(0, 0, p), z(0, 0, p))

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[0]

    @property
    def k(self) -> int:
        return self.U.shape[1]

    @property
    def num_concepts(self) -> int:
        return self.B.shape[0]

    def cores(self, weights: Tensor) -> Tensor:
        """``(G, k, k)`` cores of a ``(G, C)`` weight matrix: row g mixes concepts by weight."""
        return torch.einsum("gc,ckp,cqp->gkq", weights.to(self.B), self.B, self.A)

    def delta(self, weights: Tensor) -> Tensor:
        """Dense ``n × d`` delta of one mix (weights over the C concepts)."""
        return dense_delta(self.U, self.V, self.cores(weights[None])[0])

    def subset(self, keep: list[int]) -> LayerShare:
        """The layer with only the concepts ``keep`` (by index)."""
        return LayerShare(self.U, self.V, self.B[keep], self.A[keep])

    def extend(self, new_B: list[Tensor] = (), new_A: list[Tensor] = ()) -> Refit:
        """Every concept, old and new (dense factors ``n×p``, ``d×p``), in the extended orthonormal
        bases ``[U, orth(new ⟂ U)]``: the first step of a merge (`ShareState.merge`), in float64.

        Old concepts already lie in span(U), so the refit works in a basis of width k + r: its
        eigenproblem is (k+r)², and its cost is linear in C and free of n·C² terms.
        """
        f64 = torch.float64
        U, V = self.U.to(f64), self.V.to(f64)
        p = max([self.B.shape[2]] + [b.shape[1] for b in new_B])
        pad = lambda t: torch.nn.functional.pad(t, (0, p - t.shape[-1]))  # noqa: E731

        nb = torch.stack([pad(b.to(f64)) for b in new_B]) if len(new_B) else U.new_zeros(0, U.shape[0], p)
        na = torch.stack([pad(a.to(f64)) for a in new_A]) if len(new_A) else V.new_zeros(0, V.shape[0], p)
        Eb = _orth_complement(U, nb.permute(1, 0, 2).reshape(U.shape[0], -1))
        Ea = _orth_complement(V, na.permute(1, 0, 2).reshape(V.shape[0], -1))
        Qb, Qa = torch.cat([U, Eb], 1), torch.cat([V, Ea], 1)
        old_X = torch.nn.functional.pad(pad(self.B.to(f64)), (0, 0, 0, Eb.shape[1]))
        old_Y = torch.nn.functional.pad(pad(self.A.to(f64)), (0, 0, 0, Ea.shape[1]))
        X = torch.cat([old_X, Qb.mT @ nb])  # (C, kb, p): output side
        Y = torch.cat([old_Y, Qa.mT @ na])  # (C, ka, p): input side
        return Refit(Qb, Qa, X, Y, self.U.dtype)


@dataclass
class Spectrum:
    """The weighted Gram matrices' eigen-decompositions of one layer's refit, largest first."""

    eb: Tensor
    Pb: Tensor
    ea: Tensor
    Pa: Tensor

    def choose_k(self, k_max: int, energy: float | None = None) -> int:
        avail = min(self.Pb.shape[0], self.Pa.shape[0])
        return max(_choose_k(self.eb, avail, k_max, energy), _choose_k(self.ea, avail, k_max, energy))

    def gains(self, k_max: int) -> Tensor:
        """What each further direction (pair) removes from the weighted error: the two sides' mean."""
        k = min(k_max, self.Pb.shape[0], self.Pa.shape[0])
        return ((self.eb[:k] + self.ea[:k]) / 2).clamp_min(0)


@dataclass
class Refit:
    """One layer's concepts in its extended bases ``Qb``, ``Qa``: coordinates ``X`` (C×kb×p) and
    ``Y`` (C×ka×p), so ``ΔW_c = Qb X_c Y_cᵀ Qaᵀ``. A merge weighs the concepts, takes the spectrum
    and keeps its top k directions; `ShareState.merge` can choose k for all layers at once."""

    Qb: Tensor
    Qa: Tensor
    X: Tensor
    Y: Tensor
    dtype: torch.dtype

    def __post_init__(self):
        self.XtX, self.YtY = self.X.mT @ self.X, self.Y.mT @ self.Y
        self.norm2 = (self.XtX * self.YtY).sum((1, 2))  # ‖X Yᵀ‖_F² = tr(XᵀX YᵀY), both symmetric

    def spectrum(self, w: Tensor) -> Spectrum:
        """Eigen-decompositions of ``Σ w_c M_c M_cᵀ`` and ``Σ w_c M_cᵀ M_c`` (w: one weight per concept)."""
        w = torch.where(self.norm2 > 0, w.to(self.norm2), torch.zeros_like(self.norm2))
        Gb = torch.einsum("c,cip,cpq,cjq->ij", w, self.X, self.YtY, self.X)
        Ga = torch.einsum("c,cip,cpq,cjq->ij", w, self.Y, self.XtX, self.Y)
        eb, Pb = torch.linalg.eigh(Gb)
        ea, Pa = torch.linalg.eigh(Ga)
        return Spectrum(eb.flip(0), Pb.flip(1), ea.flip(0), Pa.flip(1))

    def truncate(self, spectrum: Spectrum, k: int) -> MergeResult:
        """The layer with the top-k directions of ``spectrum``; every concept re-projected and balanced."""
        Pb, Pa = spectrum.Pb[:, :k], spectrum.Pa[:, :k]
        Xk, Yk = Pb.mT @ self.X, Pa.mT @ self.Y
        kept2 = ((Xk.mT @ Xk) * (Yk.mT @ Yk)).sum((1, 2))
        Bn, An = balance(Xk, Yk) if k else (Xk, Yk)
        dt = self.dtype
        layer = LayerShare((self.Qb @ Pb).to(dt), (self.Qa @ Pa).to(dt), Bn.to(dt), An.to(dt))
        return MergeResult(layer, self.norm2, (self.norm2 - kept2).clamp_min(0))


def allocate(gains: dict[str, Tensor], budget: int) -> dict[str, int]:
    """Directions per layer: the ``budget`` largest gains over all layers (each layer's gains fall,
    so each layer keeps a prefix). Ties break by layer order, so the result is deterministic."""
    pool = [(-g, i, name) for i, (name, layer_gains) in enumerate(gains.items()) for g in layer_gains.tolist() if g > 0]
    k = dict.fromkeys(gains, 0)
    for _, _, name in sorted(pool)[:budget]:
        k[name] += 1
    return k


# ----------------------------------------------------------------------------- whole model


@dataclass
class ShareState:
    """Every adapted layer's `LayerShare`, plus the concepts' names and metadata, in one order.

    ``layers`` maps a module name (``"unet.down_blocks.0…to_q"``) to its layer; concept ``i``
    is entry ``i`` of every layer's coefficient stack and of ``concepts``.
    """

    layers: dict[str, LayerShare]
    concepts: list[dict] = field(default_factory=list)

    @classmethod
    def empty(cls, shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32) -> ShareState:
        return cls({name: LayerShare.empty(n, d, dtype=dtype) for name, (n, d) in shapes.items()})

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.concepts]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: layer.shape for name, layer in self.layers.items()}

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            known = ", ".join(repr(n) for n in self.names) or "none"
            raise KeyError(f"Unknown Share concept {name!r}; this file holds: {known}.") from None

    def weights(self, mix: dict[str, float]) -> Tensor:
        """A ``(C,)`` weight vector from ``{concept name: weight}``."""
        w = torch.zeros(len(self.concepts))
        for name, weight in mix.items():
            w[self.index(name)] = float(weight)
        return w

    def delta(self, layer: str, mix: dict[str, float]) -> Tensor:
        """Dense ΔW of a mix for one layer."""
        return self.layers[layer].delta(self.weights(mix))

    def merge(
        self,
        new: dict[str, dict[str, tuple[Tensor, Tensor]]] | None = None,
        meta: dict[str, dict] | None = None,
        k_max: int = 64,
        energy: float | None = None,
        normalize: bool = True,
        budget: int | None = None,
    ) -> tuple[ShareState, dict[str, dict]]:
        """Fold new concepts (``{name: {layer: (B̂ n×p, Â d×p)}}``) in; every layer is refit.

        Each layer's new basis is the top-k subspace of its stacked deltas ``[ΔW_1 … ΔW_C]``
        (output side) and ``[ΔW_1ᵀ … ΔW_Cᵀ]`` (input side): by Eckart–Young the best rank-k
        subspaces for reconstructing every ΔW, however each concept is factored. ``normalize``
        weighs every concept by ``1/‖ΔW_c‖²``, so the basis minimises the sum of *relative* errors.
        k is the smallest reaching ``energy`` of the layer's spectrum (all of it if None), at most
        ``k_max``. With a ``budget`` (total directions over all layers, instead of ``energy``), the
        weights are over all layers (``1/Σ_layers ‖ΔW_c‖²``) and the ``budget`` directions that
        remove the most of that weighted error go where they do: the sum over concepts of their
        squared overall relative error is minimised (exactly for the choice of bases, greedily
        for the sizes).

        Returns the new state and a report ``{concept: {"overall": e, "layers": {layer: e}}}``
        of relative merge errors ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` (the data-free forgetting of this
        merge), which is also appended to each concept's ``merge_errors`` history (its last
        ``MERGE_HISTORY`` entries: a file's header must not grow with C²). A layer a
        new concept does not touch counts as a zero delta there. ``self`` is left unchanged.
        """
        new, meta = new or {}, meta or {}
        clash = set(new) & set(self.names)
        if clash:
            raise ValueError(f"Concept name(s) already in this Share state: {sorted(clash)}.")
        if budget is not None and energy is not None:
            raise ValueError("A merge takes a total budget of directions or an energy threshold, not both.")
        unknown = {lname for c in new for lname in new[c]} - set(self.layers)
        if unknown:
            raise ValueError(f"New concepts touch layers this Share state does not adapt: {sorted(unknown)[:5]}")
        names = self.names + list(new)
        refits = {}
        for lname, layer in self.layers.items():
            n, d = layer.shape
            factors = [new[c].get(lname) for c in new]
            for c, f in zip(new, factors):
                if f is not None and (f[0].shape[0] != n or f[1].shape[0] != d or f[0].shape[1] != f[1].shape[1]):
                    raise ValueError(
                        f"Concept {c!r}, layer {lname}: factors {tuple(f[0].shape)} / {tuple(f[1].shape)} "
                        f"do not fit a {n}×{d} layer (expected n×p and d×p)."
                    )
            zero = (torch.zeros(n, 1), torch.zeros(d, 1))
            factors = [f if f is not None else zero for f in factors]
            refits[lname] = layer.extend([f[0] for f in factors], [f[1] for f in factors])

        def relative(norm2: Tensor) -> Tensor:
            return 1.0 / norm2.clamp_min(1e-30) if normalize else torch.ones_like(norm2)

        if budget is None:
            spectra = {lname: r.spectrum(relative(r.norm2)) for lname, r in refits.items()}
            ks = {lname: sp.choose_k(k_max, energy) for lname, sp in spectra.items()}
        else:
            total = sum((r.norm2 for r in refits.values()), torch.zeros(len(names), dtype=torch.float64))
            spectra = {lname: r.spectrum(relative(total)) for lname, r in refits.items()}
            ks = allocate({lname: sp.gains(k_max) for lname, sp in spectra.items()}, budget)
        results = {lname: refits[lname].truncate(spectra[lname], ks[lname]) for lname in refits}
        layers = {lname: r.layer for lname, r in results.items()}

        concepts = [dict(c, merge_errors=list(c.get("merge_errors", []))) for c in self.concepts]
        concepts += [dict(meta.get(c, {}), name=c, merge_errors=[]) for c in new]
        # relative errors of every (layer, concept) at once: a Python loop over C × L scalars costs seconds
        empty = torch.zeros(0, len(names), dtype=torch.float64)
        norm2_lc = torch.stack([r.norm2 for r in results.values()]) if results else empty  # (L, C)
        err2_lc = torch.stack([r.err2 for r in results.values()]) if results else empty
        rel = torch.where(norm2_lc > 0, err2_lc / norm2_lc.clamp_min(1e-300), torch.zeros_like(err2_lc)).sqrt()
        total_n, total_e = norm2_lc.sum(0), err2_lc.sum(0)
        overall = torch.where(total_n > 0, total_e / total_n.clamp_min(1e-300), torch.zeros_like(total_e)).sqrt()
        rel, overall = rel.T.tolist(), overall.tolist()
        report = {}
        for i, c in enumerate(names):
            report[c] = {"overall": overall[i], "layers": dict(zip(layers, rel[i]))}
            history = concepts[i]["merge_errors"] + [round(overall[i], 8)]
            concepts[i]["merge_errors"] = history[-MERGE_HISTORY:]
        return ShareState(layers, concepts), report

    def remove(self, name: str, k_max: int = 64, energy: float | None = None,
               budget: int | None = None) -> tuple[ShareState, dict]:
        """Drop a concept and refit the basis to the remaining ones (a merge with nothing new)."""
        i = self.index(name)
        keep = [j for j in range(len(self.concepts)) if j != i]
        rest = ShareState({n: l.subset(keep) for n, l in self.layers.items()}, [self.concepts[j] for j in keep])
        return rest.merge(k_max=k_max, energy=energy, budget=budget)

    def rename(self, old: str, new: str) -> ShareState:
        if new in self.names:
            raise ValueError(f"A concept named {new!r} already exists.")
        i = self.index(old)
        concepts = [dict(c) for c in self.concepts]
        concepts[i]["name"] = new
        return ShareState(self.layers, concepts)


# ----------------------------------------------------------------------------- training


class NewConceptLayer(nn.Module):
    """Trainable parametrisation of a new concept in one layer, the basis ``U``, ``V`` frozen.

    ``B̂ = U B + Ũ B̃`` and ``Â = V A + Ṽ Ã`` with φ temporary directions ``Ũ`` (n×φ), ``Ṽ`` (d×φ),
    so ``ΔW = B̂ Âᵀ``. At step 0 ``B = B̃ = 0`` (ΔW = 0: the base model is untouched) while
    ``A``, ``Ã`` are small random numbers and ``Ũ``, ``Ṽ`` random orthonormal directions outside
    the basis. Step 1 then moves ``B`` and ``B̃`` (their gradient is ``G Â ≠ 0``), and from step 2
    every tensor has a gradient. Input-side columns start with norm ≈ 0.58, as PEFT's LoRA A.
    """

    def __init__(self, U: Tensor, V: Tensor, p: int, phi: int, generator: torch.Generator | None = None):
        super().__init__()
        (n, k), d = U.shape, V.shape[0]
        phi = max(0, min(phi, n - k, d - k))
        self.register_buffer("U", U.detach())  # the frozen basis is referenced, not copied
        self.register_buffer("V", V.detach())
        rand = lambda *s: torch.randn(*s, generator=generator, dtype=U.dtype)  # noqa: E731
        std = 1.0 / math.sqrt(3 * max(k + phi, 1))
        self.B = nn.Parameter(torch.zeros(k, p, dtype=U.dtype))
        self.A = nn.Parameter(rand(k, p) * std)
        self.U_tmp = nn.Parameter(_random_orthonormal(U, phi, rand))
        self.V_tmp = nn.Parameter(_random_orthonormal(V, phi, rand))
        self.B_tmp = nn.Parameter(torch.zeros(phi, p, dtype=U.dtype))
        self.A_tmp = nn.Parameter(rand(phi, p) * std)

    def expanded(self) -> tuple[Tensor, Tensor, Tensor]:
        """``([U, Ũ], [V, Ṽ], core)`` so that ``share_delta`` computes this concept's delta."""
        Bc = torch.cat([self.B, self.B_tmp])
        Ac = torch.cat([self.A, self.A_tmp])
        return torch.cat([self.U, self.U_tmp], 1), torch.cat([self.V, self.V_tmp], 1), Bc @ Ac.mT

    def factors(self) -> tuple[Tensor, Tensor]:
        """Dense factors ``(B̂ n×p, Â d×p)`` (for the forward pass and the merge)."""
        return torch.addmm(self.U_tmp @ self.B_tmp, self.U, self.B), torch.addmm(self.V_tmp @ self.A_tmp, self.V, self.A)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``ΔW x`` (added into ``out`` in place when given). Uses the rank-p factors ``B̂ Âᵀ``:
        the large products are p wide, not k + φ."""
        B, A = self.factors()
        return share_delta(x, B.to(x.dtype), A.to(x.dtype), None, out=out)


def _random_orthonormal(basis: Tensor, phi: int, rand) -> Tensor:
    """φ random orthonormal columns orthogonal to ``basis``."""
    X = rand(basis.shape[0], phi)
    for _ in range(2):  # twice, so the result stays orthogonal to the basis in floating point
        X = X - basis @ (basis.mT @ X)
    return torch.linalg.qr(X)[0]


class NewConcept(nn.Module):
    """A new concept being learned: one `NewConceptLayer` per adapted layer of a `ShareState`."""

    def __init__(self, state: ShareState, p: int = 1, phi: int = 2, seed: int = 0, layers: list[str] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer_names = list(layers if layers is not None else state.layers)
        if phi < 1 and any(state.layers[n].k == 0 for n in self.layer_names):
            raise ValueError("The basis is empty (first concept): num_extra_directions (phi) must be at least 1.")
        self.layers = nn.ModuleList(
            NewConceptLayer(state.layers[n].U.float(), state.layers[n].V.float(), p, phi, g) for n in self.layer_names
        )

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        with torch.no_grad():
            return {n: tuple(t.detach().float().cpu() for t in m.factors()) for n, m in zip(self.layer_names, self.layers)}
