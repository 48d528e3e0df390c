"""The packed bitmask format: exact round trips and the documented bit layout."""

import pytest
import torch

from sparse_peft.sparsity.bitmask import (
    PackedBitmask,
    bits_to_mask,
    mask_to_bits,
    pack_bitmask,
    row_offsets_from_bits,
    unpack_bitmask,
    validate_packed,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sparse_weight(shape, sparsity=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) >= sparsity, weight, torch.zeros((), dtype=dtype))


def same_bits(a, b):
    """Bit-for-bit equality (distinguishes -0.0 from 0.0 and compares NaN payloads)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(int_dtype), b.view(int_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 13), (3, 8), (4, 1), (7, 17), (6, 64)])
def test_round_trip_bit_exact(shape, dtype):
    weight = sparse_weight(shape, 0.6, dtype, seed=shape[1])
    packed = pack_bitmask(weight)
    assert packed.bits.dtype == torch.uint8 and packed.bits.shape == (shape[0], (shape[1] + 7) // 8)
    assert packed.values.dtype == dtype and packed.nnz == int((weight != 0).sum())
    assert packed.shape == shape
    assert same_bits(unpack_bitmask(packed), weight)
    packed.validate("w")


def test_empty_and_dense_rows():
    weight = sparse_weight((4, 11), 0.5)
    weight[1] = 0.0  # an empty row
    weight[2] = torch.arange(1, 12, dtype=torch.float32)  # a fully dense row
    packed = pack_bitmask(weight)
    counts = packed.row_offsets.diff()
    assert counts[1] == 0 and counts[2] == 11
    assert packed.row_offsets[-1] == packed.nnz
    assert same_bits(unpack_bitmask(packed), weight)
    # Row i's values are exactly the nonzeros of row i, in column order.
    for i in range(4):
        row_vals = packed.values[packed.row_offsets[i]:packed.row_offsets[i + 1]]
        assert torch.equal(row_vals, weight[i][weight[i] != 0])


def test_all_zero_and_all_dense_weights():
    for weight in (torch.zeros(3, 9), torch.randn(3, 9).abs() + 1):
        packed = pack_bitmask(weight)
        assert same_bits(unpack_bitmask(packed), weight)
    assert pack_bitmask(torch.zeros(3, 9)).nnz == 0


def test_bit_order_is_little_endian_within_a_byte():
    weight = torch.zeros(2, 10)
    weight[0, 0] = 1.0  # bit 0 of byte 0
    weight[0, 3] = 2.0  # bit 3 of byte 0
    weight[1, 9] = 3.0  # bit 1 of byte 1
    bits = pack_bitmask(weight).bits
    assert bits.tolist() == [[0b00001001, 0], [0, 0b00000010]]


def test_negative_zero_is_a_pruned_position():
    weight = torch.tensor([[1.0, -0.0, 0.0, -2.0]])
    packed = pack_bitmask(weight)
    assert packed.nnz == 2 and packed.values.tolist() == [1.0, -2.0]
    dense = unpack_bitmask(packed)
    assert not torch.signbit(dense[0, 1])  # -0.0 comes back as +0.0
    assert torch.equal(dense, weight)


def test_special_values_keep_their_bits():
    weight = torch.tensor([[float("nan"), 0.0, float("-inf"), 1e-45]])
    packed = pack_bitmask(weight)
    assert packed.nnz == 3
    assert same_bits(unpack_bitmask(packed), weight)


def test_row_offsets_from_bits_and_mask_helpers():
    mask = torch.rand(9, 21, generator=torch.Generator().manual_seed(3)) > 0.4
    bits = mask_to_bits(mask)
    assert torch.equal(bits_to_mask(bits, 21), mask)
    offsets = row_offsets_from_bits(bits, 21)
    assert offsets.dtype == torch.int64 and offsets.shape == (10,)
    assert torch.equal(offsets.diff(), mask.sum(1))


def test_to_moves_and_casts_values_only():
    packed = pack_bitmask(sparse_weight((4, 12)))
    half = packed.to(dtype=torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.bits.dtype == torch.uint8
    assert half.row_offsets.dtype == torch.int64 and half.shape == packed.shape
    assert torch.equal(unpack_bitmask(half), unpack_bitmask(packed).to(torch.bfloat16))
    assert packed.nbytes == packed.nnz * 4 + 4 * 2


def test_validate_rejects_inconsistent_parts():
    packed = pack_bitmask(sparse_weight((4, 12)))
    with pytest.raises(ValueError, match="nonzeros but"):
        validate_packed(packed.values[:-1], packed.bits, packed.shape, "layer.x")
    bad_padding = packed.bits.clone()
    bad_padding[0, 1] |= 0b10000000  # bit 15 lies past in_features=12
    with pytest.raises(ValueError, match="padding bits"):
        validate_packed(packed.values, bad_padding, packed.shape, "layer.x")
    with pytest.raises(ValueError, match=r"layer.x.*shape \(out, 2\)"):
        validate_packed(packed.values, packed.bits[:, :1], packed.shape, "layer.x")
    with pytest.raises(ValueError, match="row_offsets"):
        PackedBitmask(packed.values, packed.bits, packed.row_offsets.flip(0), packed.shape).validate()
    zeroed = packed.values.clone()
    zeroed[0] = 0
    with pytest.raises(ValueError, match="stored values are zero"):
        validate_packed(zeroed, packed.bits, packed.shape, "layer.x")
    with pytest.raises(ValueError, match="bits mark"):
        unpack_bitmask(PackedBitmask(packed.values[:-1], packed.bits, packed.row_offsets, packed.shape))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        pack_bitmask(torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        pack_bitmask(torch.zeros(3, 3, dtype=torch.int32))
