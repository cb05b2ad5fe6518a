"""Weight layouts of ONNX Runtime's saved optimised CPU graph, for LoRA swaps into it.

ONNX Runtime's NCHWc transformer (ORT_ENABLE_ALL on CPUs with AVX2/AVX-512) stores each
convolution's filter re-laid out in channel blocks of 8 or 16, under a new initializer name
(`reorder_token_N`). The export finds each filter's blocked copy by value
(sdopt/export/weight_map.py) and records the layout; the runtime re-lays out the
LoRA-merged filter the same way, so sessions start from the saved optimised graph (seconds)
instead of re-optimising the original one. The layouts are MLAS's filter reorders
(onnxruntime/core/mlas/lib/reorder.cpp): OIHWBiBo (blocked input and output channels) and
OIHWBo (blocked output channels: NCHW-input and depthwise convolutions), zero-padded to
whole blocks.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("nchwc8-OIHWBiBo", "nchwc8-OIHWBo", "nchwc16-OIHWBiBo", "nchwc16-OIHWBo")


def to_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    """An OIHW filter in `layout` ("" = unchanged).

    Args:
        weight: (out, in, kh, kw).
        layout: one of LAYOUTS, or "".
    Returns:
        The C-contiguous blocked filter, zero-padded to whole blocks, shaped (out, in) padded x (kh, kw).
    """
    if not layout:
        return weight
    block = int(layout.split("-")[0][len("nchwc") :])
    o, i, h, w = weight.shape
    op = -(-o // block) * block
    if layout.endswith("BiBo"):
        ip = -(-i // block) * block
        padded = np.zeros((op, ip, h, w), weight.dtype)
        padded[:o, :i] = weight
        blocked = padded.reshape(op // block, block, ip // block, block, h, w).transpose(0, 2, 4, 5, 3, 1)
        ip_or_i = ip
    else:
        padded = np.zeros((op, i, h, w), weight.dtype)
        padded[:o] = weight
        blocked = padded.reshape(op // block, block, i, h, w).transpose(0, 2, 3, 4, 1)
        ip_or_i = i
    # Blocked order in memory, labelled with the padded OIHW dims the saved graph declares.
    return np.ascontiguousarray(blocked).reshape(op, ip_or_i, h, w)
