"""TensorRT profiles for the ControlNet graphs (issue 15): the residuals' derived dimensions.

The residual U-Net (unet/control.onnx) and each ControlNet carry inputs/outputs whose spatial
sizes are the latent size divided by 2, 4, 8 (named "latent_height/4" etc. in the manifest).
A TensorRT optimization profile must give every dynamic input a (min, opt, max) shape that is
consistent with the others at each of the three points, so these dims follow their base dim
instead of being chosen on their own. Pure python: no TensorRT import.
"""

from __future__ import annotations

Range = tuple[int, int, int]


def with_derived_dims(ranges: dict[str, Range]) -> dict[str, Range]:
    """Recompute every derived dim ("base/k") from its base dim's (min, opt, max).

    Args:
        ranges: (min, opt, max) per dim name, as `tensorrt_build.dim_ranges` computes them.
    Returns:
        The same ranges with each "base/k" set to (min // k, opt // k, max // k) of "base"
        (exact: export sizes are multiples of the U-Net's total downsampling).
    """
    out = dict(ranges)
    for name in ranges:
        base, _, k = name.partition("/")
        if k and base in ranges:
            out[name] = tuple(v // int(k) for v in ranges[base])  # type: ignore[assignment]
    return out
