"""The PyTorch twins of the sparse ops: one file per op, named as its Triton kernel in ``kernels/``
(``functional/sddmm.py`` is the twin of ``kernels/sddmm.py``), each ``<op>_reference`` taking the op's
arguments.

They have a package of their own because the kernel files import Triton at the top, and the twins
must run without Triton or a GPU; mirroring the kernel files' names keeps an op's two
implementations one name apart. ``sparse_peft.ops`` chooses between them (and is the only module
that does): call the ops through it. The same functions are ``ops.<op>_reference`` for tests and
benchmarks.
"""
