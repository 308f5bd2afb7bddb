"""The numpy backend's array kernels: numpy (LAPACK, BLAS ``@``) in place of Numba, for the
one-off check of one matrix, where loading the Numba kernels would cost more than they save (the
kernel-selection rule: :mod:`nsiter._backend`).  They import neither Numba nor SciPy.
"""
