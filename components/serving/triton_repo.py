"""`still triton`: a Triton Inference Server model repository for a bundle's student:
`<out>/<name>/config.pbtxt` (ONNX Runtime backend, dynamic batch and sequence axes, dynamic
batching, the label file for Triton's classification extension) and `<out>/<name>/1/model.onnx`.
Tokenisation stays with the client (`student/tokenizer.json` + `preprocessing.json`).
config.pbtxt is written as text: tritonclient's `model_config_pb2` would make a dev-only package
a runtime dependency (the tests parse the file with it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from components.data.files import atomic_dir
from components.serving.bundle import LABELS, MODEL_FILES, Bundle, BundleError

# ------------------------------------------------------------------------------ Triton

def triton_config(name: str, labels: int, max_batch_size: int,
                  label_file: str = "labels.txt") -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for a still ONNX student."""
    preferred = sorted({b for b in (max(1, max_batch_size // 4), max_batch_size) if b >= 1})
    inputs = "\n".join(
        f'  {{\n    name: "{n}"\n    data_type: TYPE_INT64\n    dims: [ -1 ]\n  }}'
        + ("," if i == 0 else "") for i, n in enumerate(("input_ids", "attention_mask")))
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{inputs}\n]\n"
            f'output [\n  {{\n    name: "logits"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {labels} ]\n    label_filename: "{label_file}"\n  }}\n]\n'
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]"
            f"\n  max_queue_delay_microseconds: 2000\n}}\n"
            "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n")


def write_triton(bundle: Bundle, out: str | Path, name: str = "still_student",
                 model: str | None = None, max_batch_size: int | None = None) -> Path:
    """A Triton model repository for one student graph of `bundle`; returns the model folder.
    An existing model folder of that name is replaced whole, only once the new one is
    complete."""
    model = model or bundle.model_name
    if model not in MODEL_FILES or not model.startswith("student"):
        raise BundleError(f"--model {model!r}: pick one of the bundle's student graphs "
                          f"({', '.join(m for m in bundle.manifest['models'] if 'student' in m)})")
    src = bundle.folder / MODEL_FILES[model]
    if not src.is_file():
        raise BundleError(f"{src}: not in this bundle")
    out = Path(out)
    final = out / name
    if final.exists() and not (final / "config.pbtxt").is_file():
        raise BundleError(f"{final} exists and is not a Triton model folder (no config.pbtxt); "
                          "refusing to replace it: pick another --out or --name")
    with atomic_dir(final) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / "model.onnx")
        (tmp / "labels.txt").write_text("\n".join(bundle.labels) + "\n")
        (tmp / "config.pbtxt").write_text(triton_config(
            name, len(bundle.labels), max_batch_size or bundle.batch_size))
        for side in ("tokenizer.json", "preprocessing.json"):  # what the client needs
            shutil.copyfile(bundle.folder / "student" / side, tmp / side)
        shutil.copyfile(bundle.folder / LABELS, tmp / LABELS)
    return final
