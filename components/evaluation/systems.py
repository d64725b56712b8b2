"""The systems evaluate compares: every teacher and student runtime as a `System` (runner, encoder,
size, parameters, FLOPs), their logits on a split, and the deployed path (the bundle's own
`Predictor` over the exported graphs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import Params
from components.data import artifacts
from components.data.files import file_size, read_json
from components.evaluation.flops import encoder_flops
from components.exporting.trt import engines, graphs
from components.models import student as student_io
from components.models.runtimes import Runner, TextEncoder, onnx_runner, ort_session, torch_runner
from components.models.teacher import load_saved
from components.serving.bundle import Graph, Predictor
from components.stage import StageError


@dataclass
class System:
    name: str
    runtime: str
    side: str  # "teacher" | "student"
    run: Runner  # padded ids, mask -> logits
    encoder: TextEncoder  # tokenizer configured once
    size_bytes: int
    parameters: int
    flops: Callable[[float], float]  # real tokens per example -> FLOPs per example

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.run(*self.encoder(texts))


def tensorrt_runners(params: Params, export_dir: str | Path) -> tuple[list, str | None]:
    """`(name, runner, size_bytes)` for each engine the export stage built
    (`student_trt_<precision>`; a runner takes torch CPU tensors like every other runner), or
    `([], reason)` when there are none to run here."""
    export_dir = Path(export_dir)
    try:
        entry = read_json(export_dir / "metrics.json").get("tensorrt")
    except StageError as err:
        return [], str(err)
    if entry is None:
        return [], ("export metrics have no 'tensorrt' entry (made before TensorRT support): "
                    "rerun dvc repro -f export")
    status = entry.get("status", "unknown")
    if status != "built":
        return [], status
    ok, reason = engines.availability()
    if not ok:
        return [], f"skipped (engines exist but cannot run here: {reason})"
    runners = []
    for precision in graphs.PRECISIONS:
        if entry.get(precision, {}).get("status") != "built":
            continue
        path = export_dir / graphs.ENGINE_DIR / f"{precision}.engine"
        try:
            engine = engines.TensorRTRunner(path)
        except StageError as err:
            return [], f"skipped ({err})"
        runners.append((f"student_trt_{precision}", _torch_inputs(engine), file_size(path)))
    return runners, None if runners else "no TensorRT engine marked built in export metrics"


def _torch_inputs(runner: engines.TensorRTRunner) -> Runner:
    def run(input_ids, mask) -> np.ndarray:  # torch CPU tensors, as from TextEncoder
        return runner(input_ids.numpy(), mask.numpy())

    return run


def build_systems(params: Params) -> tuple[list[System], str | None]:
    """Every system to measure, and why TensorRT engines are not among them (None if they are)."""
    from tokenizers import Tokenizer

    teacher, teacher_tok = load_saved(params.paths.teacher)
    teacher_dir = Path(params.paths.teacher)
    student_dir, export_dir = Path(params.paths.student), Path(params.paths.export)
    student = student_io.load(student_dir)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    threads = params.evaluate.num_threads
    tc, sc = teacher.hf.config, student.cfg

    def teacher_flops(n: float) -> float:
        return encoder_flops(n, tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size,
                             tc.num_labels)

    def student_flops(n: float) -> float:
        merge = {layer: sc.merge_r for layer in sc.merging_layers()}
        return encoder_flops(n, sc.layers, sc.hidden, sc.intermediate, sc.num_labels, merge)

    t_enc = TextEncoder(teacher_tok.backend_tokenizer, params.teacher.max_length)
    s_enc = TextEncoder(Tokenizer.from_file(str(student_dir / artifacts.STUDENT_TOKENIZER)),
                        params.distill.max_length, sc.min_tokens())
    if (export_dir / artifacts.TEACHER_TOKENIZER).is_file():
        exported = Tokenizer.from_file(str(export_dir / artifacts.TEACHER_TOKENIZER))
        if exported.to_str() != teacher_tok.backend_tokenizer.to_str():
            raise StageError(f"{export_dir / artifacts.TEACHER_TOKENIZER} is not the tokenizer of "
                             f"the teacher in {teacher_dir}: rerun dvc repro export")
    sides = {"teacher": (t_enc, n_teacher, teacher_flops),
             "student": (s_enc, n_student, student_flops)}

    def onnx_systems(side: str, files: tuple[tuple[str, str], ...]) -> list[System]:
        enc, n, flops = sides[side]
        return [System(name, "onnxruntime", side,
                       onnx_runner(ort_session(export_dir / file, threads)), enc,
                       file_size(export_dir / file), n, flops)
                for name, file in files if (export_dir / file).is_file()]

    systems = [
        System("teacher", "pytorch", "teacher", torch_runner(teacher), t_enc,
               file_size(teacher_dir / "model.safetensors"), n_teacher, teacher_flops),
        *onnx_systems("teacher", (("teacher_onnx", artifacts.TEACHER_FP32),
                                  ("teacher_onnx_int8", artifacts.TEACHER_INT8),
                                  ("teacher_onnx_static_int8", artifacts.TEACHER_STATIC_INT8))),
        System("student", "pytorch", "student", torch_runner(student), s_enc,
               file_size(student_dir / student_io.WEIGHTS_FILE), n_student, student_flops),
        *onnx_systems("student", (("student_onnx", artifacts.STUDENT_FP32),
                                  ("student_onnx_int8", artifacts.STUDENT_INT8),
                                  ("student_onnx_static_int8", artifacts.STUDENT_STATIC_INT8))),
    ]
    runners, trt_skip = tensorrt_runners(params, export_dir)
    for name, runner, size in runners:
        systems.append(System(name, "tensorrt", "student", runner, s_enc, size, n_student,
                              student_flops))
    return systems, trt_skip


def predict_split(systems: list[System], texts: list[str], batch_size: int
                  ) -> dict[str, np.ndarray]:
    """Every system's logits on `texts` (untimed), each encoder's batches encoded once."""
    encoded = {id(s.encoder): [s.encoder(texts[i : i + batch_size])
                               for i in range(0, len(texts), batch_size)] for s in systems}
    return {s.name: np.concatenate([s.run(*b) for b in encoded[id(s.encoder)]])
            for s in systems}


def deployed_predictor(params: Params, casc: dict | None, labels: list[str]
                       ) -> tuple[Predictor | None, str]:
    """The bundle's own `Predictor` over the exported graphs of the cascade student (and, with
    a chosen threshold, the cascade), or None and why it cannot be timed."""
    cfg = params.evaluate.cascade
    export_dir = Path(params.paths.export)
    missing = [name for name in (cfg.student, cfg.teacher) if name not in artifacts.EXPORTED_GRAPHS
               or not (export_dir / artifacts.EXPORTED_GRAPHS[name][0]).is_file()]
    if cfg.student in missing:
        return None, (f"{cfg.student} is not an exported ONNX graph, which is what a bundle "
                      "ships")
    threads = params.evaluate.num_threads

    def graph(name: str) -> Graph:
        return Graph.from_files(*(export_dir / f for f in artifacts.EXPORTED_GRAPHS[name]), threads)

    student = graph(cfg.student)
    chosen = (casc or {}).get("chosen")
    if not chosen or cfg.teacher in missing:
        why = ("no cascade threshold was chosen" if not chosen else
               f"{cfg.teacher} is not an exported ONNX graph")
        return Predictor(student, labels), f"student alone ({why})"
    return (Predictor(student, labels, (student, graph(cfg.teacher), cfg.confidence,
                                        chosen["threshold"])), "student and cascade")


def deployed_paths(predictor: Predictor, batch_size: int
                   ) -> dict[str, Callable[[list[list[str]]], object]]:
    """The deployed paths to time: the student alone and, when the predictor has one, the
    cascade, each as `still predict --input` runs them (`Predictor.stream`: batches in order,
    the cascade's deferred texts gathered into full teacher batches)."""
    paths = {"student": lambda chunks: list(predictor.stream(chunks))}
    if predictor.cascade:
        paths["cascade"] = lambda chunks: list(predictor.stream(chunks, True, batch_size))
    return paths


def deployed_deferrals(predictor: Predictor, texts: list[str], batch_size: int) -> float:
    """The fraction of `texts` the deployed cascade deferred to the teacher."""
    answers = [a for batch in predictor.stream(
        [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)], True,
        batch_size) for a in batch]
    return float(np.mean([a["answered_by"] == "teacher" for a in answers]))
