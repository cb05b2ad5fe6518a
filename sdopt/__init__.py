"""sdopt: Stable Diffusion from PyTorch/diffusers to verified ONNX/TensorRT, and a lean runtime.

`sdopt.export` needs the `[export]` extra (torch, diffusers, onnx); `sdopt.runtime` needs
only numpy, onnxruntime, tokenizers and pillow.
"""

__version__ = "0.1.0"
