"""The shared scalar checks, and the options that go through them."""

import math

import numpy as np
import pytest
import torch

import sparse_peft as sp
from sparse_peft._validation import check_int, check_sparsity, is_int, is_real


@pytest.mark.parametrize("value, expected", [
    (3, True), (np.int64(3), True), (True, False), (3.0, False), ("3", False), (None, False),
])
def test_is_int(value, expected):
    assert is_int(value) is expected


@pytest.mark.parametrize("value, expected", [
    (0.5, True), (2, True), (np.float32(0.5), True), (False, False), (math.nan, False), (math.inf, False),
    ("0.5", False),
])
def test_is_real(value, expected):
    assert is_real(value) is expected


def test_check_int_names_the_option_and_the_value():
    assert check_int(np.int64(4), "total_steps", minimum=1) == 4
    assert type(check_int(np.int64(4), "total_steps")) is int
    with pytest.raises(ValueError, match=r"total_steps must be an integer >= 1, got 0"):
        check_int(0, "total_steps", minimum=1)
    with pytest.raises(ValueError, match=r"step must be an integer, got True"):
        check_int(True, "step")


@pytest.mark.parametrize("value", [1.0, -0.1, True, math.nan, "0.5"])
def test_check_sparsity_refuses_values_outside_0_1(value):
    with pytest.raises(ValueError, match=rf"final_sparsity must be a number in \[0, 1\), got {value!r}"):
        check_sparsity(value, "final_sparsity")


@pytest.mark.parametrize("make", [
    lambda: sp.SEFTConfig(update_interval=True),
    lambda: sp.SPTConfig(base_prompt_length=True),
    lambda: sp.SPPConfig(r=True),
    lambda: sp.MaskedLoraConfig(r=True, target_modules=["q_proj"]),
    lambda: sp.cubic_sparsity(step=True, total_steps=10, final_sparsity=0.5),
])
def test_a_bool_is_not_an_integer_option(make):
    with pytest.raises(ValueError, match="True"):
        make()


def test_prune_refuses_a_bool_blocksize_and_an_infinite_damping():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="blocksize must be a positive integer, got True"):
        sp.prune(model, "magnitude", sparsity=0.5, blocksize=True)
    with pytest.raises(ValueError, match="percdamp must be a number > 0, got inf"):
        sp.prune(model, "magnitude", sparsity=0.5, percdamp=math.inf)
