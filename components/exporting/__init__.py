"""Models to deployable graphs: ONNX (`onnx_export`), the parity check against PyTorch
(`parity`), INT8 (`quantization`), the student and teacher sides of the export stage
(`sides`) and TensorRT (`trt/`)."""
