"""Triton kernels for masked sparse matmuls, installed as ``sparse_peft.kernels``.

One op per file, each with a PyTorch reference twin; ``sparse_peft.ops`` chooses between them.
"""
