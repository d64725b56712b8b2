"""TensorRT for the exported student: `graphs` rewrites the ONNX model into the graph an engine is
built from (CPU only), `engines` builds, runs and checks the engines (CUDA GPU + TensorRT 10).
The stage steps that use them live in `components/export.py` and `components/evaluate.py`.

Named `trt`, never `tensorrt`: a project module of that name would shadow the package."""
