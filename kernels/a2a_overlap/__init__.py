"""Expert-parallel MoE FFN: dispatch/combine all-to-all overlapped with the local experts.

See ``api.py`` for the pipeline, the exchange protocol and the overlap schedule.
"""
from kernels.a2a_overlap.api import moe_ffn_ep

__all__ = ["moe_ffn_ep"]
