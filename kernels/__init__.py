"""Triton kernels and their torch APIs."""
from kernels._interpreter import patch_bf16_dot

patch_bf16_dot()
