"""LoRA files and ONNX weights, shared by export (merge, weight map) and runtime (hot-swap).

Neutral like `sdopt.manifest`: imports neither `sdopt.export` nor `sdopt.runtime`, and no torch.
`files` reads LoRA files into deltas, `keys` resolves their key spellings, `onnx_weights`
reads initializers out of .onnx files, `layout` re-lays out filters as ONNX Runtime's
optimised CPU graph stores them.
"""
