"""Exact Gaussian-DP accounting against Opacus' PRV accountant (numerical, with an error bound) and its RDP bound."""

import math
import warnings

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import gdp as opacus_gdp
from opacus.accountants.analysis import rdp as opacus_rdp

from split_unet.accounting import gaussian_epsilon, gdp_delta

pytestmark = pytest.mark.unit

DELTA = 1e-5
PRV_EPS_ERROR = 0.01  # Opacus' default: the PRV accountant's epsilon is an upper bound within this of the truth


def _rdp_epsilon(noise_multiplier, mechanisms):
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=mechanisms, orders=orders)
    return opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)[0]


def _prv_epsilon(noise_multiplier, mechanisms):
    accountant = PRVAccountant()
    for _ in range(mechanisms):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    with warnings.catch_warnings():  # log(1 - q) at q = 1: Opacus handles the infinity, numpy warns about it
        warnings.simplefilter("ignore", RuntimeWarning)
        return accountant.get_epsilon(DELTA, eps_error=PRV_EPS_ERROR)


@pytest.mark.parametrize("noise_multiplier, mechanisms", [(0.5, 4), (1.0, 10), (2.0, 100), (5.0, 1000)])
def test_epsilon_is_exact_and_below_the_rdp_bound(noise_multiplier, mechanisms):
    epsilon = gaussian_epsilon(noise_multiplier, mechanisms, DELTA)
    # The PRV accountant's upper bound lies within its error of the exact value, never below it.
    prv = _prv_epsilon(noise_multiplier, mechanisms)
    assert epsilon <= prv <= epsilon + 2 * PRV_EPS_ERROR
    # Opacus' own closed-form inversion, where its [0, 500] search covers the root.
    mu = math.sqrt(mechanisms) / noise_multiplier
    assert epsilon == pytest.approx(opacus_gdp.eps_from_mu(mu=mu, delta=DELTA), rel=1e-6)
    # RDP is a bound: never tighter than the exact value (strictly looser here).
    assert _rdp_epsilon(noise_multiplier, mechanisms) > epsilon
    assert gdp_delta(epsilon, mu) == pytest.approx(DELTA, rel=1e-6)


def test_weak_noise_beyond_opacus_search_range():
    """The sweep's activation noise (sigma 0.004; 192 steps x 3 levels): epsilon ~ mu^2 / 2, finite and exact."""
    mechanisms, noise_multiplier = 576, 0.004
    mu = math.sqrt(mechanisms) / noise_multiplier
    with pytest.raises(ValueError):
        opacus_gdp.eps_from_mu(mu=mu, delta=DELTA)
    epsilon = gaussian_epsilon(noise_multiplier, mechanisms, DELTA)
    assert mu ** 2 / 2 < epsilon < mu ** 2 / 2 + mu * 5 and gdp_delta(epsilon, mu) == pytest.approx(DELTA, rel=1e-4)
    assert _rdp_epsilon(noise_multiplier, mechanisms) > epsilon


def test_edge_cases_and_monotonicity():
    assert gaussian_epsilon(1.0, 0, DELTA) == 0.0
    assert gaussian_epsilon(0.0, 3, DELTA) == math.inf
    # So much noise that even epsilon 0 meets delta: 2 Phi(mu / 2) - 1 <= delta.
    assert gaussian_epsilon(1e6, 1, DELTA) == 0.0
    values = [gaussian_epsilon(1.0, k, DELTA) for k in (1, 2, 8, 32)]
    assert values == sorted(values) and gaussian_epsilon(2.0, 8, DELTA) < gaussian_epsilon(1.0, 8, DELTA)
