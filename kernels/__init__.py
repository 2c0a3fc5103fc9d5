"""Triton kernels, each beside a plain PyTorch reference. Imports torch and triton only."""
