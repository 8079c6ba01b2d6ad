"""Triton kernels and their torch APIs."""
from kernels._interpreter import patch_bf16

patch_bf16()
