import pytest

from sparse_peft.sparsity import cubic_sparsity


def test_end_points_and_clamping():
    assert cubic_sparsity(0, 100, 0.7) == 0.0
    assert cubic_sparsity(100, 100, 0.7) == 0.7
    assert cubic_sparsity(10_000, 100, 0.7) == 0.7  # after the ramp: stays at the target
    assert cubic_sparsity(5, 100, 0.7, initial_sparsity=0.2, start_step=10) == 0.2  # before the ramp
    assert cubic_sparsity(110, 100, 0.7, initial_sparsity=0.2, start_step=10) == 0.7


def test_zhu_gupta_formula():
    # s_t = s_f + (s_0 - s_f) (1 - t/T)^3 ; at t = T/2 the remaining gap is 1/8 of the total
    assert cubic_sparsity(50, 100, 0.8, initial_sparsity=0.0) == pytest.approx(0.8 - 0.8 / 8)
    assert cubic_sparsity(25 + 7, 100, 0.5, initial_sparsity=0.1, start_step=7) == pytest.approx(
        0.5 + (0.1 - 0.5) * 0.75**3)


def test_monotone_and_front_loaded():
    values = [cubic_sparsity(t, 40, 0.9) for t in range(41)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    first_half_gain = values[20] - values[0]
    assert first_half_gain > 0.8 * 0.9  # cubic: 7/8 of the way after half the steps


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(step=0, total_steps=10, final_sparsity=1.0), "1.0"),
    (dict(step=0, total_steps=10, final_sparsity=-0.1), "-0.1"),
    (dict(step=0, total_steps=10, final_sparsity=0.5, initial_sparsity=0.6), "0.6"),
    (dict(step=0, total_steps=0, final_sparsity=0.5), "total_steps"),
    (dict(step=0, total_steps=10, final_sparsity=0.5, start_step=-1), "start_step"),
    (dict(step=1.5, total_steps=10, final_sparsity=0.5), "1.5"),
])
def test_bad_input(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        cubic_sparsity(**kwargs)
