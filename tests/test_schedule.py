import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flm_rt.schedule import alpha_of_gamma, gamma_grid, gamma_of_alpha

TOL = 1e-9  # required agreement with the reference's table


@pytest.mark.parametrize("k", ["1000", "4099", "30522", "50257", "50258"])
def test_matches_reference_table(schedule_table, k):
    grid = torch.tensor(schedule_table["grid"], dtype=torch.float64)
    want_g = torch.tensor(schedule_table[k]["alpha_to_gamma"], dtype=torch.float64)
    want_a = torch.tensor(schedule_table[k]["gamma_to_alpha"], dtype=torch.float64)
    assert (gamma_of_alpha(grid, int(k)) - want_g).abs().max().item() < TOL
    assert (alpha_of_gamma(grid, int(k)) - want_a).abs().max().item() < TOL


@settings(max_examples=30, deadline=None)
@given(tau=st.floats(0.0, 1.0), k=st.sampled_from([2, 7, 1000, 50258]))
def test_inverse_roundtrip(tau, k):
    g = gamma_of_alpha(tau, k)
    assert 0.0 <= g.item() <= 1.0
    # alpha(gamma(tau)) == tau wherever alpha is not flat at float64 resolution
    if alpha_of_gamma(0.0, k).item() < tau < 1 - 1e-9:
        assert math.isclose(alpha_of_gamma(g, k).item(), tau, abs_tol=1e-9)


def test_endpoints_and_monotone():
    for k in (2, 1000, 50258):
        assert gamma_of_alpha(0.0, k).item() == 0.0 and gamma_of_alpha(1.0, k).item() == 1.0
        assert alpha_of_gamma(1.0, k).item() == 1.0
        g = torch.linspace(0, 1, 201, dtype=torch.float64)
        a = alpha_of_gamma(g, k)
        assert bool((a[1:] >= a[:-1]).all())


def test_grid_and_bad_k():
    g = gamma_grid(4, 1000)
    assert len(g) == 5 and g[0] == 0.0 and g[-1] == 1.0
    with pytest.raises(ValueError, match="vocabulary size"):
        alpha_of_gamma(0.5, 1)
