"""The decoding cache: one entry per layer and the number of tokens seen so far.

A lightning layer keeps its fp32 state ``[B, H, D, E]`` (``S`` of the recurrence after the
last token); a softmax layer keeps the rotated keys and the values of every token seen,
``[B, S, num_kv_heads, head_dim]`` in the model's dtype. The cache is updated in place by
each forward that is given it and carries no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import LIGHTNING, SOFTMAX, ModelConfig

MIN_CAPACITY = 16  # token slots of a KV cache's first buffer


@dataclass
class LightningState:
    """A lightning layer's recurrent state: float32 ``[B, H, D, E]``, contiguous."""

    state: torch.Tensor


@dataclass
class KVCache:
    """A softmax layer's keys (rotary applied) and values: ``[B, S, num_kv_heads, head_dim]``.

    ``key`` and ``value`` are views of the first S slots of buffers with room to spare;
    :meth:`append` writes new tokens into the spare slots and doubles the buffers when they
    are full, so a decode step costs O(1) amortised copies, not a copy of the whole cache.
    """

    key: torch.Tensor
    value: torch.Tensor
    _key_buf: torch.Tensor | None = field(default=None, repr=False)
    _value_buf: torch.Tensor | None = field(default=None, repr=False)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add ``[B, T, num_kv_heads, head_dim]`` keys and values after the S cached ones."""
        S, need = self.key.shape[1], self.key.shape[1] + key.shape[1]
        if self._key_buf is None or self._key_buf.shape[1] < need:
            capacity = max(need, 2 * (0 if self._key_buf is None else self._key_buf.shape[1]), MIN_CAPACITY)
            bufs = []
            for old in (self.key, self.value):
                buf = old.new_empty(old.shape[0], capacity, *old.shape[2:])
                buf[:, :S] = old
                bufs.append(buf)
            self._key_buf, self._value_buf = bufs
        self._key_buf[:, S:need] = key
        self._value_buf[:, S:need] = value
        self.key, self.value = self._key_buf[:, :need], self._value_buf[:, :need]


@dataclass
class Cache:
    """Per-layer entries (index = layer index) and ``seq_len``, the position of the next token."""

    layers: list[LightningState | KVCache]
    seq_len: int = 0

    @property
    def batch_size(self) -> int:
        """The batch size of the first layer's entry (0 for no layers)."""
        if not self.layers:
            return 0
        first = self.layers[0]
        return (first.state if isinstance(first, LightningState) else first.key).shape[0]

    @classmethod
    def new(cls, config: ModelConfig, batch_size: int, *, device: torch.device | str, dtype: torch.dtype) -> Cache:
        """An empty cache: zero lightning states, keys and values of length 0."""
        H, D, KV = config.num_heads, config.head_dim, config.num_kv_heads
        layers: list[LightningState | KVCache] = []
        for kind in config.layer_kinds:
            if kind == LIGHTNING:
                layers.append(LightningState(torch.zeros(batch_size, H, D, D, device=device, dtype=torch.float32)))
            else:
                empty = torch.zeros(batch_size, 0, KV, D, device=device, dtype=dtype)
                layers.append(KVCache(empty, empty))
        return cls(layers)

    def check(self, config: ModelConfig, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError naming ``cache`` unless it fits ``config``, this batch, device and dtype."""
        if not isinstance(self.layers, list) or not all(isinstance(e, (LightningState, KVCache)) for e in self.layers):
            raise ValueError("cache.layers must be a list of LightningState / KVCache entries (see Cache.new)")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 0:
            raise ValueError(f"cache.seq_len must be an int >= 0, got {self.seq_len!r}")
        kinds = tuple(LIGHTNING if isinstance(e, LightningState) else SOFTMAX for e in self.layers)
        if kinds != config.layer_kinds:
            raise ValueError(f"cache holds layers {kinds}, but the model {config.name!r} has {config.layer_kinds}")
        if self.batch_size != batch_size:
            raise ValueError(f"cache was built for batch size {self.batch_size}, but input_ids has batch size {batch_size}")
        H, D, KV = config.num_heads, config.head_dim, config.num_kv_heads
        for i, entry in enumerate(self.layers):
            if isinstance(entry, LightningState):
                want = [("state", entry.state, (batch_size, H, D, D), torch.float32)]
            else:
                want = [(name, t, (batch_size, self.seq_len, KV, D), dtype)
                        for name, t in (("key", entry.key), ("value", entry.value))]
            for name, t, shape, t_dtype in want:
                if tuple(t.shape) != shape or t.dtype != t_dtype or t.device != device:
                    raise ValueError(
                        f"cache.layers[{i}].{name} must be {t_dtype} {list(shape)} on {device} "
                        f"(seq_len = {self.seq_len}), got {t.dtype} {list(t.shape)} on {t.device}"
                    )
