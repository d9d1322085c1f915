"""Differential-privacy accounting of the Gaussian mechanism (Opacus' RDP accountant): the sites' noise filter
reports its (epsilon, delta) with it, and the server recomputes the report with the same function."""

from __future__ import annotations

from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis


def gaussian_epsilon(noise_multiplier: float, mechanisms: int, delta: float) -> float:
    """Epsilon of ``mechanisms`` composed Gaussian mechanisms (sensitivity 1, std ``noise_multiplier``);
    infinite for a release without noise."""
    if mechanisms == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=mechanisms, orders=orders)
    return float(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])
