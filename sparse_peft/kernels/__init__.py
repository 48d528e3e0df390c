"""Triton kernels for masked sparse matmuls.

One op per file, each with a PyTorch twin in the file of the same name in ``sparse_peft/functional/``;
``sparse_peft.ops`` chooses between them.
"""
