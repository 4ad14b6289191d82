"""Triton kernels (internal): one file per op and direction, e.g. attention_forward.py."""
