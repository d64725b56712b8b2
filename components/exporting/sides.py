"""The two models the export stage writes, as one shape: a `Side` holds a model, its encoder and
the files it gets (`student_side`, `teacher_side`), and `export_side` runs the same steps on
either (ONNX FP32 with parity, dynamic and static INT8, tokenizer, preprocessing.json)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import Params
from components.data import artifacts
from components.data.files import reading, write_json
from components.exporting.onnx_export import export_model
from components.exporting.parity import heldout_batches
from components.exporting.quantization import static_calibration
from components.models import student as student_io
from components.models.runtimes import TextEncoder
from components.models.teacher import load_saved
from components.serving.bundle import preprocessing
from components.text.encoding import pad_id


@dataclass
class Side:
    """One model to export and the names of what it becomes in the export folder."""

    name: str  # "student" | "teacher"
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    encoder: TextEncoder
    heads: int
    hidden: int
    min_tokens: int
    files: tuple[str, str, str]  # FP32, dynamic INT8, static INT8 graphs
    tokenizer_file: str
    preprocessing_file: str
    preprocessing: dict
    save_tokenizer: Callable[[Path], None]


def student_side(params: Params) -> Side:
    """The distilled student, as the distill stage saved it."""
    from tokenizers import Tokenizer

    student_dir = Path(params.paths.student)
    damaged = ("it is damaged or was written by another version of the code: rerun the distill "
               "stage (dvc repro -f distill)")
    with reading(f"{student_dir} ({student_io.CONFIG_FILE}, {student_io.WEIGHTS_FILE})",
                 "the student model", damaged):
        model = student_io.load(student_dir)
    with reading(student_dir / artifacts.STUDENT_TOKENIZER, "the student's tokenizer", damaged):
        tokenizer = Tokenizer.from_file(str(student_dir / artifacts.STUDENT_TOKENIZER))
    sc = model.cfg
    encoder = TextEncoder(tokenizer, params.distill.max_length, sc.min_tokens())
    return Side("student", model, tokenizer, encoder, sc.heads, sc.hidden, sc.min_tokens(),
                (artifacts.STUDENT_FP32, artifacts.STUDENT_INT8, artifacts.STUDENT_STATIC_INT8),
                artifacts.STUDENT_TOKENIZER, artifacts.STUDENT_PREPROCESSING,
                preprocessing(tokenizer.to_str(), encoder.pad, params.distill.max_length,
                              sc.min_tokens()),
                lambda dst: shutil.copyfile(student_dir / artifacts.STUDENT_TOKENIZER, dst))


def teacher_side(params: Params) -> Side:
    """The fine-tuned teacher, as a user who does not distill would deploy it."""
    teacher, hf_tok = load_saved(params.paths.teacher, attn_implementation="eager")
    tokenizer = hf_tok.backend_tokenizer
    encoder = TextEncoder(tokenizer, params.teacher.max_length)
    tc = teacher.hf.config
    return Side("teacher", teacher, tokenizer, encoder, tc.num_attention_heads, tc.hidden_size,
                encoder.min_length,
                (artifacts.TEACHER_FP32, artifacts.TEACHER_INT8, artifacts.TEACHER_STATIC_INT8),
                artifacts.TEACHER_TOKENIZER, artifacts.TEACHER_PREPROCESSING,
                preprocessing(tokenizer.to_str(), pad_id(tokenizer), params.teacher.max_length),
                lambda dst: tokenizer.save(str(dst)))


def export_side(params: Params, side: Side, data: list, out: Path) -> dict:
    """`side`'s graphs (FP32 parity-checked on `data`; dynamic and static INT8 as
    `export.int8` and `export.static_int8` say), tokenizer and preprocessing.json into `out`.
    Returns its metrics."""
    cfg = params.export
    static = cfg.static_int8.enabled
    fp32, int8, static_int8 = side.files
    result = export_model(side.model, data, out, fp32, int8 if cfg.int8 else None, cfg,
                          side.heads, side.hidden, static_int8 if static else None,
                          static_calibration(params, side.encoder) if static else None,
                          heldout_batches(params, side.encoder))
    side.save_tokenizer(out / side.tokenizer_file)
    write_json(out / side.preprocessing_file, side.preprocessing)
    return result
