"""KV geometries of real models, for the synthetic engine.

The CPU path copies whole blocks as opaque bytes, so all that matters is how many
bytes one block of one layer holds: ``2 (K and V) x block_tokens x kv_heads x head_dim
x dtype_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    def block_bytes(self, block_tokens: int) -> int:
        """Bytes of one block of one layer, K and V planes together."""
        return 2 * block_tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    def token_bytes(self) -> int:
        """KV bytes per token over all layers."""
        return self.layers * self.block_bytes(1)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layers} layers x {self.kv_heads} KV heads x head dim "
            f"{self.head_dim} x {self.dtype_bytes} B = {self.token_bytes() / 1024:.0f} KiB/token"
        )


PRESETS = {
    s.name: s
    for s in (
        ModelShape("qwen3-14b", layers=40, kv_heads=8, head_dim=128),
        ModelShape("qwen3-8b", layers=36, kv_heads=8, head_dim=128),
        ModelShape("llama3-8b", layers=32, kv_heads=8, head_dim=128),
        ModelShape("llama3-70b", layers=80, kv_heads=8, head_dim=128),
        ModelShape("qwen3-0.6b", layers=28, kv_heads=8, head_dim=128),
    )
}


def parse_shape(text: str) -> ModelShape:
    """A preset name, or ``LAYERS:KV_HEADS:HEAD_DIM[:DTYPE_BYTES]``."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (3, 4) or min(numbers) <= 0:
        raise ValueError(
            f"unknown model shape {text!r}: use one of {', '.join(PRESETS)} "
            "or LAYERS:KV_HEADS:HEAD_DIM[:DTYPE_BYTES], e.g. 40:8:128:2"
        )
    return ModelShape(text, *numbers)
