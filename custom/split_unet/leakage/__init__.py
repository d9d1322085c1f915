"""Leakage evaluation: what the exchanged activations and gradients give away (plain PyTorch)."""
