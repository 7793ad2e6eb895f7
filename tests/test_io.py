"""The Share file (share_diffusers/io.py): format v2 and v1, bounded validated reads, safe concurrent writes.

Malformed files are built from a valid small one by rewriting its safetensors header or tensors;
the fuzz test (hypothesis) mutates valid files at random. Tests that could allocate run under an
address-space cap of the current size + 1 GiB, so "nothing allocates more than 1 GB" is enforced
by the kernel, not assumed: an allocation past it fails and shows up as a wrong exception.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import resource
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import share_diffusers.io as io
import share_diffusers.locking as locking
from share_diffusers.card import write_model_card
from share_diffusers.io import (
    ABSENT,
    ShareFileChangedError,
    ShareFileError,
    ShareFileLockedError,
    atomic_write,
    file_token,
    locked,
    read_share,
    save_share,
)
from share_diffusers.subspace import LayerShare, ShareState
from share_lab.share_v1 import save_share_v1
from share_lab.tiny_pipelines import synthetic_state

ROOT = Path(__file__).resolve().parents[1]
V1_FILE = ROOT / "tests" / "data" / "share-v1.safetensors"  # the demo file that version 1 of share-diffusers shipped
SHAPES = {"unet.a.to_q": (6, 5), "unet.b.to_k": (4, 3), "text_encoder.c.q_proj": (5, 5)}
KS = {"unet.a.to_q": 3, "unet.b.to_k": 2, "text_encoder.c.q_proj": 1}
WIDTHS = [1, 2, 1]  # concept "owl" is 2 wide, so the others are zero-padded in v2


def small_state(widths=WIDTHS, seed=0, dtype=torch.float32) -> ShareState:
    layers = synthetic_state(SHAPES, len(widths), k=KS, p=max(widths, default=1), seed=seed, scale=1.0, dtype=dtype).layers
    for layer in layers.values():
        for i, p in enumerate(widths):
            layer.B[i, :, p:] = layer.A[i, :, p:] = 0
    names = (["cat", "owl", "dog", "emu", "yak"] + [f"concept-{i}" for i in range(5, len(widths))])[: len(widths)]
    concepts = [{"name": c, "trigger": f"<{c}>", "steps": 10, "merge_errors": [0.0, 0.01]} for c in names]
    return ShareState(layers, concepts)


def assert_same(a: ShareState, b: ShareState) -> None:
    assert a.names == b.names and a.concepts == b.concepts and list(a.layers) == list(b.layers)
    for name in a.layers:
        for t in "UVBA":
            x, y = getattr(a.layers[name], t), getattr(b.layers[name], t)
            p = min(x.shape[-1], y.shape[-1])
            assert torch.equal(x[..., :p].float(), y[..., :p].float()), (name, t)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bytes of a valid small Share file in each format version."""
    tmp = tmp_path_factory.mktemp("files")
    save_share(small_state(), tmp / "v2.safetensors")
    save_share_v1(small_state(), tmp / "v1.safetensors")
    return {"v2": (tmp / "v2.safetensors").read_bytes(), "v1": (tmp / "v1.safetensors").read_bytes()}


# ----------------------------------------------------------------------------- rewriting files


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(table: dict | str, body: bytes) -> bytes:
    text = (table if isinstance(table, str) else json.dumps(table)).encode()
    return len(text).to_bytes(8, "little") + text + body


def edit_header(data: bytes, edit) -> bytes:
    """Apply ``edit(share_header)`` (in place, or return a replacement) and re-encode the file."""
    table, body = split(data)
    header = json.loads(table["__metadata__"][io.METADATA_KEY])
    result = edit(header)
    header = result if isinstance(result, str) else header  # a string replaces the header's text
    table["__metadata__"][io.METADATA_KEY] = header if isinstance(header, str) else json.dumps(header)
    return join(table, body)


def edit_table(data: bytes, edit) -> bytes:
    table, body = split(data)
    edit(table)
    return join(table, body)


def edit_tensors(data: bytes, edit) -> bytes:
    """Apply ``edit(tensors)`` to the loaded tensors and save them again, with the same metadata."""
    table, _ = split(data)
    tensors = safetensors.torch.load(data)
    edit(tensors)
    return safetensors.torch.save(tensors, metadata=table["__metadata__"])


def first(table: dict, prefix: str) -> str:
    return next(k for k in table if k.startswith(prefix))


@pytest.fixture
def address_space_limit():
    """Cap the address space at its current size + 1 GiB while the test runs (Linux)."""
    try:
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + (1 << 30)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("address space already capped")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        with pytest.raises((RuntimeError, MemoryError)):  # the cap bites: 1.5 GB cannot be had
            torch.ones(3 << 28, dtype=torch.int16)
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------------------- format


def test_v2_stores_four_stacked_tensors_per_layer_and_round_trips(tmp_path):
    state = small_state(dtype=torch.float64)  # written as float32
    path = save_share(state, tmp_path / "s.safetensors", config={"basis_rank": 8, "base_model": "tiny"})
    table, _ = split(path.read_bytes())
    header = json.loads(table["__metadata__"][io.METADATA_KEY])
    assert header["format_version"] == io.FORMAT_VERSION == 2
    assert [c["p"] for c in header["concepts"]] == WIDTHS and "key" not in header["concepts"][0]
    names = set(table) - {"__metadata__"}
    assert names == {f"{kind}.{layer}.{t}" for layer in SHAPES for kind, ts in (("basis", "UV"), ("coefficients", "BA")) for t in ts}
    assert table["coefficients.unet.a.to_q.B"]["shape"] == [3, 3, 2] and table["coefficients.unet.a.to_q.B"]["dtype"] == "F32"

    loaded, header = read_share(path)
    assert_same(loaded, state)
    assert loaded.layers["unet.a.to_q"].B.dtype == torch.float32 and loaded.layers["unet.a.to_q"].B.shape == (3, 3, 2)
    assert header["config"] == {"basis_rank": 8, "base_model": "tiny"} and type(header["config"]) is dict
    assert header["file_token"] == file_token(path)
    # what the reader returns, the writer writes back unchanged
    save_share(loaded, tmp_path / "again.safetensors", config=header["config"])
    assert split((tmp_path / "again.safetensors").read_bytes()) == split(path.read_bytes())  # (metadata order varies)


def test_empty_states_and_empty_layers_round_trip(tmp_path):
    empty = ShareState.empty(SHAPES)  # k = 0 everywhere, no concepts
    loaded, header = read_share(save_share(empty, tmp_path / "empty.safetensors"))
    assert loaded.names == [] and loaded.shapes == SHAPES and all(l.k == 0 for l in loaded.layers.values())
    assert header["config"] == {}
    one = small_state([1])
    one.layers["unet.b.to_k"] = LayerShare(torch.zeros(4, 0), torch.zeros(3, 0), torch.zeros(1, 0, 1), torch.zeros(1, 0, 1))
    assert_same(read_share(save_share(one, tmp_path / "one.safetensors"))[0], one)


def test_the_v1_demo_file_once_shipped_loads_and_is_rewritten_as_v2(tmp_path):
    state, header = read_share(V1_FILE)
    assert header["format_version"] == 1
    assert state.names == ["striped-blob-00", "dotted-star-05", "checkered-blob-02", "ringed-star-07"]
    assert len(state.layers) == 24 and {l.k for l in state.layers.values()} == {4}
    assert {tuple(l.B.shape) for l in state.layers.values()} == {(4, 4, 1)}
    assert state.concepts[0]["trigger"] == "xobiz" and "key" not in state.concepts[0] and "p" not in state.concepts[0]
    again, header2 = read_share(save_share(state, tmp_path / "v2.safetensors", config=header["config"]))
    assert header2["format_version"] == 2 and header2["config"] == header["config"]
    assert_same(again, state)


def test_a_v1_file_written_by_the_old_code_loads_as_the_same_state(tmp_path):
    state = small_state([1, 2, 1, 3])
    v1, _ = read_share(save_share_v1(state, tmp_path / "v1.safetensors", config={"x": 1}))
    v2, _ = read_share(save_share(state, tmp_path / "v2.safetensors"))
    assert_same(v1, state)
    assert_same(v1, v2)
    assert v1.layers["unet.a.to_q"].B.shape == (4, 3, 3)


@pytest.mark.parametrize("version", [0, -1, 1.5, "2", 99, 3, True, None, 2.0, [2]])
def test_unknown_format_versions_are_refused_by_name(files, tmp_path, version):
    path = tmp_path / "s.safetensors"
    path.write_bytes(edit_header(files["v2"], lambda h: h.update(format_version=version)))
    with pytest.raises(ShareFileError, match=f"format version {re.escape(repr(version))} is"):
        read_share(path)


# ----------------------------------------------------------------------------- malformed files


def _concepts(h):
    return h["concepts"]


MALFORMED = {
    # the Share header itself
    "metadata is a JSON list": (lambda d: edit_header(d, lambda h: "[1, 2]"), "must be a JSON object, got list"),
    "metadata is a JSON number": (lambda d: edit_header(d, lambda h: "3"), "must be a JSON object, got int"),
    "metadata is JSON null": (lambda d: edit_header(d, lambda h: "null"), "must be a JSON object, got NoneType"),
    "metadata is not JSON": (lambda d: edit_header(d, lambda h: '{"format": '), "not valid JSON"),
    "metadata nested 100,000 deep": (lambda d: edit_header(d, lambda h: "[" * 100_000), "not valid JSON"),
    "metadata with a duplicate key": (
        lambda d: edit_header(d, lambda h: json.dumps(h).replace('"format_version": 2', '"format_version": 2, "format_version": 2')),
        "key 'format_version' twice",
    ),
    "another format": (lambda d: edit_header(d, lambda h: h.update(format="lora")), "header format is 'lora'"),
    "p is 2e7 (a float)": (
        lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=2e7)),
        r"p of concept 'cat' must be an integer, got 20000000.0",
    ),
    "p is 1e12 (a float)": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=1e12)), "must be an integer"),
    "p is 20,000,000": (
        lambda d: edit_header(d, lambda h: _concepts(h)[1].update(p=20_000_000)),
        r"p of concept 'owl' is 20000000, outside \[1, 1048576\]",
    ),
    "p wider than the tensors": (
        lambda d: edit_header(d, lambda h: _concepts(h)[1].update(p=3)),
        r"has shape \(3, 3, 2\), the header says \(3, 3, 3\)",
    ),
    "p is 10**12": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=10**12)), r"p of concept 'cat' is 1000000000000, outside"),
    "p is true": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=True)), "must be an integer, got True"),
    "p is '1'": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p="1")), "must be an integer, got '1'"),
    "p is 0": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=0)), "p of concept 'cat' is 0, outside"),
    "coefficients past a concept's width": (
        lambda d: edit_tensors(d, lambda t: t["coefficients.unet.b.to_k.A"].__setitem__((0, 1, 1), 0.5)),
        "coefficients.unet.b.to_k.A: concept 'cat' has coefficients past its width p = 1",
    ),
    "k is true": (lambda d: edit_header(d, lambda h: h["k"].update({"unet.b.to_k": True})), "k of layer unet.b.to_k must be an integer"),
    "k larger than the layer": (
        lambda d: edit_header(d, lambda h: h["k"].update({"unet.b.to_k": 4})),
        r"k of layer unet.b.to_k is 4, outside \[0, 3\]",
    ),
    "k of a layer missing": (lambda d: edit_header(d, lambda h: h["k"].pop("unet.b.to_k")), "k lists layers"),
    "layer side a string": (
        lambda d: edit_header(d, lambda h: h["base_model"]["layers"].update({"unet.b.to_k": ["4", 3]})),
        "layer unet.b.to_k n must be an integer",
    ),
    "layer side 10**12": (lambda d: edit_header(d, lambda h: h["base_model"]["layers"].update({"unet.b.to_k": [10**12, 3]})), "outside"),
    "layer shape not a pair": (lambda d: edit_header(d, lambda h: h["base_model"]["layers"].update({"unet.b.to_k": [4]})), r"expected \[n, d\]"),
    "layers not an object": (lambda d: edit_header(d, lambda h: h["base_model"].update(layers=[])), "base_model.layers must be a JSON object"),
    "base_model missing": (lambda d: edit_header(d, lambda h: h.pop("base_model")), "base_model must be a JSON object"),
    "fingerprint of other layers": (
        lambda d: edit_header(d, lambda h: h["base_model"].update(fingerprint="0" * 16)),
        "fingerprint '0000000000000000' does not match",
    ),
    "concepts not a list": (lambda d: edit_header(d, lambda h: h.update(concepts={"cat": 1})), "concepts must be a list, got dict"),
    "a concept not an object": (lambda d: edit_header(d, lambda h: _concepts(h).__setitem__(0, "cat")), "concept 0 must be a JSON object"),
    "name an integer": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(name=5)), "concept 0 has name 5; names are non-empty strings"),
    "name empty": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(name="")), "concept 0 has name ''"),
    "name missing": (lambda d: edit_header(d, lambda h: _concepts(h)[2].pop("name") and None), "concept 2 has name None"),
    "duplicate names": (lambda d: edit_header(d, lambda h: _concepts(h)[2].update(name="cat")), "duplicate concept names: 'cat'"),
    "trigger a number": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(trigger=7)), "trigger 7; triggers are strings"),
    "merge_errors with a string": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(merge_errors=["x"])), "merge_errors"),
    "merge_errors with NaN": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(merge_errors=[math.nan])), "merge_errors"),
    "config a list": (lambda d: edit_header(d, lambda h: h.update(config=[1])), "config must be a JSON object"),
    "more concepts than coefficients": (
        lambda d: edit_header(d, lambda h: _concepts(h).append({"name": "new", "p": 1})),
        r"has shape \(3, 3, 2\), the header says \(4, 3, 2\)",
    ),
    "a layer the file has no tensors for": (
        lambda d: edit_header(
            d,
            lambda h: (
                h["base_model"]["layers"].update({"unet.z": [4, 4]}),
                h["k"].update({"unet.z": 1}),
                h["base_model"].update(fingerprint=io.fingerprint({n: tuple(s) for n, s in h["base_model"]["layers"].items()})),
            ),
        ),
        "tensor basis.unet.z.U is missing",
    ),
    "a layer named lora": (
        lambda d: edit_header(d, lambda h: (h["base_model"]["layers"].update({"unet.lora_up": [4, 4]}), h["k"].update({"unet.lora_up": 1}))),
        "contains 'lora'",
    ),
    # the safetensors container
    "float8 tensor": (
        lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(dtype="F8_E4M3")),
        "dtype 'F8_E4M3'; Share tensors are floating point",
    ),
    "int32 tensor": (lambda d: edit_table(d, lambda t: t[first(t, "coefficients.")].update(dtype="I32")), "dtype 'I32'"),
    "bool tensor": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(dtype="BOOL")), "dtype 'BOOL'"),
    "unknown dtype": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(dtype=None)), "dtype None"),
    "a shape of 10**9 × 10**9": (
        lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(shape=[10**9, 10**9])),
        "not a readable safetensors file",
    ),
    "a shape with a float": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(shape=[6.0, 3])), "must be an integer"),
    "a shape with true": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(shape=[True, 3])), "must be an integer"),
    "a negative offset": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(data_offsets=[-8, 64])), "outside"),
    "overlapping tensors": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(data_offsets=[4, 76])), "not a readable safetensors file"),
    "an entry with an extra field": (lambda d: edit_table(d, lambda t: t[first(t, "basis.")].update(x=1)), "not a readable safetensors file"),
    "metadata values not strings": (
        lambda d: edit_table(d, lambda t: t["__metadata__"].update({io.METADATA_KEY: json.loads(t["__metadata__"][io.METADATA_KEY])})),
        "metadata values must be strings",
    ),
    "metadata a list": (lambda d: edit_table(d, lambda t: t.update(__metadata__=[])), "safetensors metadata must be a JSON object"),
    "container header a list": (lambda d: join("[]", b""), "safetensors header must be a JSON object"),
    "duplicate tensor names": (
        lambda d: join(
            (lambda t: json.dumps(t).replace('"basis.', '"basis.unet.b.to_k.U": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "basis.', 1))(
                split(d)[0]
            ),
            split(d)[1],
        ),
        "key 'basis.unet.b.to_k.U' twice",
    ),
    "header length past the end": (lambda d: (len(d)).to_bytes(8, "little") + d[8:], "not a readable safetensors file"),
    "header length zero": (lambda d: bytes(8) + d[8:], "not a readable safetensors file"),
    "empty file": (lambda d: b"", "not a readable safetensors file"),
    "7 bytes": (lambda d: d[:7], "not a readable safetensors file"),
    "truncated in the header": (lambda d: d[:100], "not a readable safetensors file"),
    "truncated by one byte": (lambda d: d[:-1], "truncated or corrupted"),
    "one byte appended": (lambda d: d + b"\0", "truncated or corrupted"),
    "header bytes not UTF-8": (lambda d: d[:8] + b"\xff" + d[9:], "not valid JSON"),
    # tensors
    "a tensor missing": (lambda d: edit_tensors(d, lambda t: t.pop("basis.unet.b.to_k.V")), "tensor basis.unet.b.to_k.V is missing"),
    "an extra tensor": (
        lambda d: edit_tensors(d, lambda t: t.update({"extra.x": torch.zeros(2)})),
        r"unexpected tensors not described by the header: \['extra.x'\]",
    ),
    "a basis of the wrong shape": (
        lambda d: edit_tensors(d, lambda t: t.update({"basis.unet.b.to_k.U": torch.zeros(4, 3)})),
        r"has shape \(4, 3\), the header says \(4, 2\)",
    ),
    "NaN in a coefficient": (
        lambda d: edit_tensors(d, lambda t: t["coefficients.unet.a.to_q.B"].__setitem__((2, 0, 0), math.nan)),
        "B of layer unet.a.to_q \\(concept 'dog'\\) contains NaN or Inf",
    ),
    "Inf in a basis": (
        lambda d: edit_tensors(d, lambda t: t["basis.unet.b.to_k.U"].__setitem__((0, 0), math.inf)),
        "U of layer unet.b.to_k contains NaN or Inf",
    ),
    "a coefficient of 1e38": (
        lambda d: edit_tensors(d, lambda t: t["coefficients.unet.a.to_q.A"].__setitem__((1, 0, 0), 1e38)),
        r"concept 'owl'\) has values up to 1e\+38; refused",
    ),
    "a coefficient of 2e6 in float64": (
        lambda d: edit_tensors(
            d, lambda t: t.update({"coefficients.unet.b.to_k.B": t["coefficients.unet.b.to_k.B"].double().index_fill_(0, torch.tensor([0]), 2e6)})
        ),
        "has values up to 2e\\+06",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_share_file_error_naming_the_problem(files, tmp_path, address_space_limit, case):
    mutate, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(files["v2"]))
    with pytest.raises(ShareFileError, match=message) as info:
        read_share(path)
    assert str(path) in str(info.value)


V1_MALFORMED = {
    "v1 key missing": (lambda d: edit_header(d, lambda h: _concepts(h)[0].pop("key") and None), "has tensor key None"),
    "v1 key an integer": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(key=0)), "has tensor key 0"),
    "v1 duplicate keys": (lambda d: edit_header(d, lambda h: _concepts(h)[1].update(key="c0000")), "duplicate concept keys: 'c0000'"),
    "v1 p of 20,000,000": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=20_000_000)), r"is 20000000, outside"),
    "v1 p wider than the tensors": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=2)), r"has shape \(3, 1\), the header says \(3, 2\)"),
    "v1 p of 2e7": (lambda d: edit_header(d, lambda h: _concepts(h)[0].update(p=2e7)), "must be an integer"),
    "v1 truncated": (lambda d: d[: len(d) // 2], "not a readable safetensors"),
}


@pytest.mark.parametrize("case", list(V1_MALFORMED))
def test_malformed_v1_files_raise_share_file_error(files, tmp_path, address_space_limit, case):
    mutate, message = V1_MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(mutate(files["v1"]))
    with pytest.raises(ShareFileError, match=message):
        read_share(path)


def test_v1_keys_that_overlap_layer_names_are_refused(tmp_path):
    """Key "c0000.x" with layer "to_q" and key "c0000" with layer "x.to_q" name the same tensor."""
    U = torch.eye(4)[:, :1]
    layer = lambda: LayerShare(U, U, torch.ones(2, 1, 1), torch.ones(2, 1, 1))  # noqa: E731
    state = ShareState({"x.to_q": layer(), "to_q": layer()}, [{"name": "a"}, {"name": "b"}])
    path = save_share_v1(state, tmp_path / "v1.safetensors")
    path.write_bytes(edit_header(path.read_bytes(), lambda h: _concepts(h)[1].update(key="c0000.x")))
    with pytest.raises(ShareFileError, match="tensor name concepts.c0000.x.to_q.B is claimed twice"):
        read_share(path)


def test_v1_widths_cannot_ask_for_more_than_the_file_holds(tmp_path, address_space_limit):
    """v1 zero-pads every concept to the widest: a wide concept among many must not blow up the stack."""
    state = small_state([1] * 200)
    path = save_share_v1(state, tmp_path / "v1.safetensors")
    # one concept 2**18 wide (its tensors really in the file, 12 MB): stacked, 200 × that = 2.5 GB
    wide = edit_tensors(
        path.read_bytes(), lambda t: [t.update({f"concepts.c0000.{l}.{x}": torch.zeros(KS[l], 1 << 18)}) for l in SHAPES for x in "BA"]
    )
    wide = edit_header(wide, lambda h: _concepts(h)[0].update(p=1 << 18))
    path.write_bytes(wide)
    with pytest.raises(ShareFileError, match="would stack to"):
        read_share(path)


def test_declared_sizes_are_checked_before_anything_is_allocated(files, tmp_path, address_space_limit):
    """The issue's examples: ``"p": 2e7`` made read_share allocate 2.4 GB, ``1e12`` raised RuntimeError."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for p in (2e7, 20_000_000, 1e12, 10**12, 2**62):
        for layout in ("v1", "v2"):
            path = tmp_path / "p.safetensors"
            path.write_bytes(edit_header(files[layout], lambda h, p=p: [c.update(p=p) for c in h["concepts"]]))
            with pytest.raises(ShareFileError):
                read_share(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # kB


# ----------------------------------------------------------------------------- fuzz

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=4),
    st.sampled_from([0, -1, 1, 2, 3, 1.5, 2e7, 1e12, 10**12, 2**62, "2", [], {}, [1, 2], [0, 0], "F8_E4M3", "I64", "F16", "BF16", "F64"]),
    st.lists(st.integers(-2, 2**40), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mutate_json(draw, value):
    """One random edit deep inside a JSON value: replace, delete or add an entry."""
    if isinstance(value, (dict, list)) and value and draw(st.booleans()):
        keys = list(value) if isinstance(value, dict) else list(range(len(value)))
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["descend", "descend", "delete", "add"]))
        if action == "descend":
            value[key] = mutate_json(draw, value[key])
        elif action == "delete":
            del value[key]
        elif isinstance(value, dict):
            value[draw(st.text(max_size=6))] = draw(NASTY)
        else:
            value.insert(key, draw(NASTY))
        return value
    return draw(NASTY)


@st.composite
def mutated_files(draw, files):
    data = files[draw(st.sampled_from(["v1", "v2"]))]
    kind = draw(st.sampled_from(["flip", "truncate", "share header", "container header", "value"]))
    if kind == "flip":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "share header":
        return edit_header(data, lambda h: mutate_json(draw, h))
    if kind == "container header":
        table, body = split(data)
        meta = table.pop("__metadata__")
        table = mutate_json(draw, table)
        if isinstance(table, dict):
            table["__metadata__"] = meta
        return join(table, body)
    table, body = split(data)  # a float32 value in the data section set to something extreme
    body = bytearray(body)
    i = draw(st.integers(0, len(body) // 4 - 1)) * 4
    body[i : i + 4] = torch.tensor([draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e7, 1e38, -0.0, 1e-45]))]).numpy().tobytes()
    return join(table, bytes(body))


def test_fuzzed_files_load_or_raise_share_file_error(files, tmp_path, address_space_limit):
    """Every mutation of a valid file gives a valid state or ShareFileError, never another exception;
    whatever loads can be written back and read again identically."""
    path, back = tmp_path / "fuzz.safetensors", tmp_path / "back.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(
        max_examples=int(os.environ.get("SHARE_FUZZ_EXAMPLES", 600)),
        deadline=None,
        database=None,
        derandomize=not os.environ.get("SHARE_FUZZ_RANDOM"),
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated_files(files))
    def check(data):
        path.write_bytes(data)
        try:
            state, header = read_share(path)
        except ShareFileError:
            outcomes["refused"] += 1
            return
        outcomes["loaded"] += 1
        assert isinstance(header["config"], dict)
        save_share(state, back, config=header["config"])
        assert_same(read_share(back)[0], state)

    check()
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes  # both sides were exercised
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # kB


# ----------------------------------------------------------------------------- writing


def test_save_share_refuses_what_read_share_would_refuse(tmp_path):
    path = save_share(small_state(), tmp_path / "s.safetensors")
    before = path.read_bytes()

    def broken(edit):
        state = small_state()
        edit(state)
        return state

    cases = [
        (broken(lambda s: s.layers["unet.a.to_q"].B.__setitem__((1, 0, 0), math.nan)), "B of layer unet.a.to_q \\(concept 'owl'\\) contains NaN"),
        (broken(lambda s: s.layers["unet.a.to_q"].A.__setitem__((0, 0, 0), 1e7)), "has values up to 1e\\+07"),
        (broken(lambda s: s.concepts[0].update(name=3)), "names are non-empty strings"),
        (broken(lambda s: s.concepts[2].update(name="cat")), "duplicate concept names"),
        (broken(lambda s: s.concepts.pop()), "do not fit each other and 2 concepts"),
        (broken(lambda s: s.layers.update({"unet.lora": s.layers["unet.a.to_q"]})), "contains 'lora'"),
    ]
    for state, message in cases:
        with pytest.raises(ShareFileError, match=message):
            save_share(state, path)
        assert path.read_bytes() == before
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_share(small_state(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors", "s.safetensors.lock"]


def test_writes_keep_the_file_mode_and_new_files_get_the_umask(tmp_path):
    path = tmp_path / "s.safetensors"
    old = os.umask(0o027)
    try:
        save_share(small_state(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a new file: 0666 less the umask
        for mode in (0o644, 0o600, 0o664):
            path.chmod(mode)
            save_share(small_state(seed=1), path)
            assert stat.S_IMODE(path.stat().st_mode) == mode
        card = tmp_path / "README.md"
        write_model_card(path, small_state())
        card.chmod(0o644)
        write_model_card(path, small_state([1]))
        assert stat.S_IMODE(card.stat().st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_writes_leave_the_file_and_no_temporaries(tmp_path, error):
    path = save_share(small_state(), tmp_path / "s.safetensors")
    before = path.read_bytes()

    def failing(tmp):
        Path(tmp).write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, failing)
    with pytest.raises(type(error)):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(io, "save_file", lambda tensors, tmp, metadata=None: failing(tmp))
            save_share(small_state(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors", "s.safetensors.lock"]


def _dying_writer(path: str) -> None:
    """A writer killed (no cleanup runs) after half of its temporary is on disk."""
    io.save_file = lambda tensors, tmp, metadata=None: (Path(tmp).write_bytes(b"half"), os._exit(9))
    save_share(small_state(seed=1), path)


# "spawn", not "fork": a fork of a process with other threads alive (an earlier test's server
# client, torch's pools) can inherit a held lock and hang forever
SPAWN = multiprocessing.get_context("spawn")


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    path = save_share(small_state(), tmp_path / "s.safetensors")
    before = path.read_bytes()
    proc = SPAWN.Process(target=_dying_writer, args=(str(path),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9 and path.read_bytes() == before
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".s.safetensors.")
    (tmp_path / ".other.safetensors.0123456789abcdef.tmp").write_bytes(b"not ours")
    save_share(small_state(seed=2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.safetensors.0123456789abcdef.tmp", "s.safetensors", "s.safetensors.lock"]


# ----------------------------------------------------------------------------- concurrent writers


def test_a_file_changed_since_it_was_read_is_not_overwritten(tmp_path):
    path = save_share(small_state(), tmp_path / "s.safetensors")
    state, header = read_share(path)
    other, other_header = read_share(path)
    assert header["file_token"] == other_header["file_token"] == file_token(path)

    save_share(state.rename("cat", "lion"), path, expected=header["file_token"])  # unchanged: written
    written = path.read_bytes()
    with pytest.raises(ShareFileChangedError, match="was changed by another writer since it was read"):
        save_share(other.rename("dog", "wolf"), path, expected=other_header["file_token"])  # the lost update
    assert path.read_bytes() == written

    new = tmp_path / "new.safetensors"
    assert file_token(new) == ABSENT
    save_share(state, new, expected=ABSENT)
    with pytest.raises(ShareFileChangedError, match="was created by another writer"):
        save_share(state, new, expected=ABSENT)
    new.unlink()
    with pytest.raises(ShareFileChangedError, match="was deleted"):
        save_share(state, new, expected=header["file_token"])
    assert not new.exists()
    with pytest.raises(TypeError, match="file token"):
        save_share(state, path, expected=header)


def test_a_writer_waits_for_the_lock_and_times_out_clearly(tmp_path):
    path = save_share(small_state(), tmp_path / "s.safetensors")
    before = path.read_bytes()
    inside, release = threading.Event(), threading.Event()

    def holder():
        with locked(path):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(10)
    start = time.monotonic()
    with pytest.raises(ShareFileLockedError, match=r"being written by another process .*s.safetensors.lock for more than 0.3 s"):
        save_share(small_state(seed=1), path, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 3
    assert path.read_bytes() == before

    waiter = threading.Thread(target=lambda: save_share(small_state(seed=1), path, timeout=10))
    waiter.start()
    time.sleep(0.3)
    assert path.read_bytes() == before  # still waiting
    release.set()
    thread.join()
    waiter.join()
    assert_same(read_share(path)[0], small_state(seed=1))
    assert isinstance(ShareFileLockedError("x"), TimeoutError)


def _add_concepts(path: str, tag: str, count: int) -> None:
    """One writer of test_concurrent_writers_keep_every_concept: lock, re-read, merge, save."""
    g = torch.Generator().manual_seed(hash(tag) % 1000)
    for i in range(count):
        with locked(path, timeout=60) as current:
            state = current.state or ShareState.empty(SHAPES)
            new = {f"{tag}{i}": {l: (torch.randn(n, 1, generator=g), torch.randn(d, 1, generator=g)) for l, (n, d) in SHAPES.items()}}
            state, _ = state.merge(new, k_max=4)
            time.sleep(0.02)  # a wide window: without the lock the other writer's concept would be lost
            current.save(state, {"writer": tag})
            state.layers.clear()  # the saved file, not this object, is what counts


def test_concurrent_writers_keep_every_concept(tmp_path):
    path = str(tmp_path / "s.safetensors")
    writers = [SPAWN.Process(target=_add_concepts, args=(path, tag, 5)) for tag in ("a", "b", "c")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    state, header = read_share(path)
    assert sorted(state.names) == sorted(f"{t}{i}" for t in "abc" for i in range(5))
    assert header["config"]["writer"] in "abc"


def test_locked_is_reentrant_and_reports_no_file(tmp_path):
    path = tmp_path / "s.safetensors"
    with locked(path, timeout=1) as current:
        assert current.state is None and current.header is None and current.token == ABSENT
        current.save(small_state())  # save_share inside the block does not wait for its own lock
        save_share(small_state(seed=1), path, timeout=1, expected=current.token)
        (tmp_path / "sub").mkdir()
        os.symlink(path, tmp_path / "link.safetensors")
        for spelling in (tmp_path / "sub" / ".." / "s.safetensors", tmp_path / "link.safetensors"):
            save_share(small_state(seed=1), spelling, timeout=1)  # the same lock, however the path is spelled
        assert (tmp_path / "link.safetensors").is_symlink()  # the link still points to the file written
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "s.safetensors", "s.safetensors.lock", "sub"]
    with locked(path, timeout=1) as current:
        assert_same(current.state, small_state(seed=1))
        assert current.token == current.header["file_token"] == file_token(path)


def test_without_fcntl_writes_go_unlocked_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(locking, "fcntl", None)
    with pytest.warns(RuntimeWarning, match="without a lock"):
        save_share(small_state(), tmp_path / "s.safetensors")
    assert_same(read_share(tmp_path / "s.safetensors")[0], small_state())


def test_the_file_scale_benchmark_runs(tmp_path):
    """benchmarks/file_scale.py at a small size: v1 and v2 timed, the ratio and the JSON written."""
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "file_scale.py"), "--concepts", "20", "--v1", "20", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    rows, layers = summary["rows"], summary["setup"]["layers"]  # the demo file's layers
    assert layers == len(read_share(ROOT / "assets" / "demo.share.safetensors")[0].layers)
    assert [(r["layout"], r["concepts"]) for r in rows] == [("v1", 20), ("v2", 20)]
    assert rows[1]["tensors"] == 4 * layers and rows[0]["tensors"] == 2 * layers + 2 * layers * 20
    assert f"| 20 | v2 | {4 * layers} |" in result.stdout
