"""Engine-library helpers that the exporter, the runtime and the benchmark all use.

Neutral ground: nothing here imports `sdopt.export` or `sdopt.runtime`, and every engine
library (cuda-python, TensorRT, ONNX Runtime) is imported only inside the function that needs it.

- `sdopt.engines.cuda`: cuda-python's runtime bindings, error checks, driver/runtime versions.
- `sdopt.engines.trt`: importing TensorRT, its shared logger, version rules, refitting engines.
- `sdopt.engines.ort`: ONNX Runtime session options and the saved optimised CPU graph.
"""
