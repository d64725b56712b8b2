"""TensorRT for the exported student: `graphs` rewrites the ONNX model into the graph an engine is
built from (CPU only), `engines` builds, runs and checks the engines (CUDA GPU + TensorRT 10),
`build` is the export stage's TensorRT step; evaluate runs the engines through
`components.evaluation.systems.tensorrt_runners`.

Named `trt`, never `tensorrt`: a project module of that name would shadow the package."""
