"""File names inside stage outputs that more than one stage reads (the start of the artifacts
contract: a stage finds another stage's files here, never by importing that stage).

The export folder (`paths.export`) holds the deployable ONNX graphs of both sides:
the student (`model.onnx`, `model.int8.onnx`, its `tokenizer.json`) and the fine-tuned teacher
(`teacher.onnx`, `teacher.int8.onnx`, `teacher.tokenizer.json`), so that evaluate measures the
teacher a user would deploy instead of distilling (ONNX Runtime, FP32 and INT8), not only
PyTorch eager.
"""

from __future__ import annotations

STUDENT_FP32 = "model.onnx"
STUDENT_INT8 = "model.int8.onnx"
STUDENT_TOKENIZER = "tokenizer.json"
TEACHER_FP32 = "teacher.onnx"
TEACHER_INT8 = "teacher.int8.onnx"
TEACHER_TOKENIZER = "teacher.tokenizer.json"
EXPORT_METRICS = "metrics.json"
