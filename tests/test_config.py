"""ShareConfig: one vocabulary for a file's settings, stored in the header and read back."""

import pytest

from share_diffusers import ShareConfig
from share_diffusers.config import resolve_config, stored_config


def test_round_trip_and_old_spellings():
    config = ShareConfig(basis_rank=32, basis_energy=0.99, coef_rank=2, num_extra_directions=4, base_model="org/model")
    assert ShareConfig.from_dict(config.to_dict()) == config
    old = ShareConfig.from_dict({"basis_rank": 64, "energy": 0.9, "written_by_a_newer_version": 1})
    assert old == ShareConfig(basis_rank=64, basis_energy=0.9)
    assert ShareConfig.from_dict(None) == ShareConfig.from_dict({}) == ShareConfig()
    assert ShareConfig.from_dict({"conv_kernels": {"unet.a.conv1": [3, 3]}}).conv_kernels == {"unet.a.conv1": (3, 3)}
    assert config.merge_kwargs() == {"k_max": 32, "energy": 0.99, "budget": None}


@pytest.mark.parametrize("values, message", [
    ({"basis_rank": 0}, "basis_rank must be a whole number ≥ 1"),
    ({"basis_rank": 2.5}, "basis_rank"),
    ({"coef_rank": True}, "coef_rank"),
    ({"num_extra_directions": -1}, "num_extra_directions must be a whole number ≥ 0"),
    ({"basis_energy": 1.5}, r"basis_energy must be a number in \(0, 1\]"),
    ({"basis_energy": float("nan")}, "basis_energy"),
    ({"base_model": 3}, "base_model must be a string"),
    ({"basis_budget": 0}, "basis_budget must be a whole number ≥ 1"),
    ({"basis_budget": 8, "basis_energy": 0.9}, "basis_budget and basis_energy both choose"),
    ({"conv_kernels": {"unet.conv_in": [3]}}, r"conv_kernels must map layer names to \[kh, kw\]"),
    ({"conv_kernels": ["unet.conv_in"]}, "conv_kernels"),
])
def test_bad_values_are_refused_naming_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        ShareConfig.from_dict(values)
    with pytest.raises(ValueError, match="JSON object"):
        ShareConfig.from_dict([1, 2])


def test_resolve_keeps_the_files_basis_and_refuses_a_contradiction_unless_rebased():
    stored = ShareConfig(basis_rank=64, coef_rank=1)
    assert resolve_config(None, basis_rank=None, coef_rank=None) == ShareConfig()
    assert resolve_config(stored, basis_rank=None, coef_rank=2) == ShareConfig(basis_rank=64, coef_rank=2)
    assert resolve_config(stored, basis_rank=64) == stored  # the same value is not a contradiction
    with pytest.raises(ValueError, match=r"--basis_rank 16 \(the file has 64\).*--rebase"):
        resolve_config(stored, basis_rank=16)
    assert resolve_config(stored, rebase=True, basis_rank=16).basis_rank == 16


def test_a_header_without_settings_keeps_the_size_of_its_basis():
    assert stored_config({"k": {"unet.a": 5, "unet.b": 40}, "config": {}}).basis_rank == 40
    assert stored_config({"k": {"unet.a": 5}, "config": {"basis_rank": 8}}).basis_rank == 8
    assert stored_config({"k": {}, "config": {}}) == ShareConfig()
