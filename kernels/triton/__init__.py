"""Triton kernels, one module per op. Importing this package does not import Triton; the op modules do.

Every kernel here is reached through the public dispatch functions in ``kernels/<op>.py``.
"""
