"""Triton kernels of frkern, one family per file, each beside its plain-PyTorch reference.

Kernels know nothing of diffusers or of frkern's runtime: they take tensors and numbers.
"""
