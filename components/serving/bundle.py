"""The bundle: what a user ships and calls, and the small Python API that loads it.

A bundle is one self-contained folder written by the ship stage (`paths.bundle`):

    bundle.json          manifest: format, sha256 + size of every other file, the default
                         model, the deployment batch size, the params, git commit and data
                         version of the run that made it
    README.md, card.html the model card (Hugging Face layout) and its rendered page
    labels.json          {"labels": [class names]}, index = logit position
    student/             model.onnx (FP32), model.int8.onnx (ONNX Runtime dynamic INT8),
                         model.static_int8.onnx (static INT8, when exported),
                         tokenizer.json, preprocessing.json
    teacher/             (with the cascade) the teacher graph it defers to, its tokenizer and
                         preprocessing.json
    cascade.json         (with the cascade) student and teacher graphs, confidence measure and
                         the threshold chosen on validation, with its validation/test figures
    pareto.png           accuracy vs cost of every evaluated system (shown in the card)

`preprocessing.json` says how text becomes the graph's inputs, exactly as evaluate fed them:
the tokenizer's own normaliser (lowercasing included, recorded as `lowercase`), truncation to
`max_length` tokens keeping the special tokens, right padding with `pad_id` to the longest
sequence of the batch (at least `min_length`, which a token-merging student needs), int64
`input_ids` and `attention_mask` in, float `logits` out.

    from components.serving.bundle import load_bundle
    bundle = load_bundle("artifacts/bundle")        # verifies every file against bundle.json
    bundle.predict(["some text"])                   # [{"label": ..., "probability": ...}]
    bundle.predict(texts, cascade=True)             # + "answered_by", "confidence"

Only ONNX Runtime, `tokenizers`, numpy and scipy are needed: no torch, no training stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax as scipy_softmax

from components.data.files import read_json, sha256_file
from components.evaluation import cascade as rule
from components.stage import StageError
from components.text.encoding import (
    INPUTS,
    OUTPUTS,
    Encoder,
    pin_tokenizer_threads,
    session_options,
)

FORMAT = "still-bundle/1"
MANIFEST = "bundle.json"
CARD = "README.md"
CARD_HTML = "card.html"
LABELS = "labels.json"
CASCADE = "cascade.json"
PARETO_PNG = "pareto.png"
PREPROCESSING = "preprocessing.json"
TOKENIZER = "tokenizer.json"
# System name (as evaluate names it) -> file inside the bundle
MODEL_FILES = {
    "student_onnx": "student/model.onnx",
    "student_onnx_int8": "student/model.int8.onnx",
    "student_onnx_static_int8": "student/model.static_int8.onnx",
    "teacher_onnx": "teacher/model.onnx",
    "teacher_onnx_int8": "teacher/model.int8.onnx",
    "teacher_onnx_static_int8": "teacher/model.static_int8.onnx",
}
# The student graphs a bundle carries whenever evaluate measured them, as the card names them.
SHIPPED_STUDENTS = {"student_onnx": "FP32", "student_onnx_int8": "ONNX Runtime dynamic INT8",
                    "student_onnx_static_int8": "ONNX Runtime static INT8, calibrated on "
                                                "validation"}


class BundleError(StageError):
    """A bundle that cannot be used as it is: missing, incomplete, tampered or not a bundle."""


def file_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` but the manifest, by POSIX relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p),
                                               "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def side(system: str) -> str:
    """The bundle sub-folder of a system's graph: `student` or `teacher`."""
    return MODEL_FILES[system].split("/")[0]


def verify(folder: str | Path) -> dict[str, Any]:
    """The manifest of the bundle in `folder`, after checking every file it lists (present,
    same size, same sha256). Raises BundleError naming each file that differs."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder (`dvc repro` writes one to "
                          "artifacts/bundle)")
    if not path.is_file():
        raise BundleError(f"{folder}: not a still bundle (no {MANIFEST}); point --bundle at "
                          "the folder the ship stage wrote (artifacts/bundle)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: cannot read the manifest ({err}); the bundle is damaged: "
                          "rebuild it with `dvc repro ship`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: format {got!r} is not {FORMAT!r}; this still reads "
                          f"{FORMAT} bundles: rebuild it with `dvc repro ship`")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: lists no files; the bundle is damaged: rebuild it with "
                          "`dvc repro ship`")
    problems = []
    for rel, entry in sorted(files.items()):
        target = folder / rel
        if not target.is_file():
            problems.append(f"{rel}: missing")
        elif target.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: {target.stat().st_size} bytes, the manifest says "
                            f"{entry.get('bytes')}")
        elif sha256_file(target) != entry.get("sha256"):
            problems.append(f"{rel}: content differs from the manifest (sha256 "
                            f"{entry.get('sha256', '?')[:12]}...)")
    if problems:
        raise BundleError(f"{folder}: {len(problems)} file(s) do not match {MANIFEST}, so the "
                          "bundle is not what the pipeline wrote (edited, truncated or "
                          "swapped): " + "; ".join(problems) + ". Restore it from where it "
                          "was shipped, or rebuild it with `dvc repro ship`")
    return manifest


def softmax(logits: np.ndarray) -> np.ndarray:
    return scipy_softmax(np.asarray(logits, dtype=np.float64), axis=-1)


def tokenizer_lowercases(tokenizer_json: str) -> bool:
    """Whether a `tokenizers` JSON normaliser lowercases (a Lowercase step, or BERT's
    normaliser with `lowercase: true`), so a card can say so without guessing."""
    def visit(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Lowercase" or (node.get("type") == "BertNormalizer"
                                                   and node.get("lowercase")):
                return True
            return any(visit(v) for v in node.get("normalizers", []) or [])
        return False

    return visit(json.loads(tokenizer_json).get("normalizer"))


def preprocessing(tokenizer_json: str, pad_id: int, max_length: int,
                  min_length: int = 1) -> dict[str, Any]:
    """The `preprocessing.json` of a graph (see the module docstring): what a caller in any
    language must do to turn text into this graph's inputs."""
    return {
        "tokenizer": TOKENIZER,
        "lowercase": tokenizer_lowercases(tokenizer_json),  # done by the tokenizer's normaliser
        "max_length": max_length,
        "truncation": "right: at max_length tokens, the special tokens kept",
        "padding": "right: to the longest sequence in the batch, at least min_length",
        "pad_id": pad_id,
        "min_length": min_length,
        "inputs": {name: "int64 [batch, sequence]" for name in INPUTS},
        "outputs": {"logits": "float32 [batch, labels]"},
    }


@dataclass
class Graph:
    """One ONNX classifier with its text preprocessing (see the module docstring)."""

    session: Any  # onnxruntime.InferenceSession
    encoder: Encoder  # the tokenizer truncating at max_length (pre-cut), padding per batch

    @classmethod
    def load(cls, folder: Path, model: str, threads: int = 0) -> Graph:
        sub = folder / model.split("/")[0]
        return cls.from_files(folder / model, sub / TOKENIZER, sub / PREPROCESSING, threads)

    @classmethod
    def from_files(cls, graph: Path, tokenizer: Path, preprocessing_file: Path,
                   threads: int = 0) -> Graph:
        """A graph from its three files (inside a bundle, or in the export stage's folder,
        which evaluate times through this same class)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        pre = read_json(preprocessing_file)
        encoder = Encoder(Tokenizer.from_file(str(tokenizer)), int(pre["max_length"]),
                          int(pre.get("min_length", 1)))
        encoder.pad = int(pre["pad_id"])
        try:
            session = ort.InferenceSession(str(graph), session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT has its own exception types for bad graphs
            raise BundleError(f"{graph}: ONNX Runtime cannot load it ({err})") from None
        return cls(session, encoder)

    def inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(zip(INPUTS, self.encoder.arrays(texts), strict=True))

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(list(OUTPUTS), feed)[0]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        return self.run(self.inputs(texts))


class Predictor:
    """Labels for batches of texts from one student graph, or from the cascade (the student
    first, the teacher graph for the texts whose confidence is below the threshold): what
    `Bundle.predict` and `still predict` run, and what evaluate times as the deployed path.

    Args:
        student: the student graph that answers (without the cascade).
        labels: class names, index = logit position.
        cascade: `(student graph, teacher graph, confidence measure, threshold)` of the
            cascade policy, or None.
    """

    def __init__(self, student: Graph, labels: list[str],
                 cascade: tuple[Graph, Graph, str, float] | None = None):
        self.student, self.labels, self.cascade = student, labels, cascade

    def answers(self, probs: np.ndarray) -> list[dict[str, Any]]:
        best = probs.argmax(-1)
        return [{"label": self.labels[k], "probability": float(p[k])}
                for k, p in zip(best, probs, strict=True)]

    def student_batch(self, batch: Sequence[str]) -> list[dict[str, Any]]:
        return self.answers(softmax(self.student.logits(batch)))

    def cascade_batch(self, batch: Sequence[str]) -> list[dict[str, Any]]:
        student, teacher, measure, threshold = self.cascade
        logits = student.logits(batch)
        # The same rule evaluate chose the threshold with (components.evaluation.cascade).
        conf = rule.confidence(logits, measure)
        defer = rule.deferred(logits, measure, threshold)
        answers = self.answers(softmax(logits))
        if defer.any():
            picked = [t for t, d in zip(batch, defer, strict=True) if d]
            it = iter(self.answers(softmax(teacher.logits(picked))))
            answers = [next(it) if d else a for a, d in zip(answers, defer, strict=True)]
        return [{**a, "answered_by": "teacher" if d else "student", "confidence": float(c)}
                for a, d, c in zip(answers, defer, conf, strict=True)]

    def predict(self, batch: Sequence[str], cascade: bool = False) -> list[dict[str, Any]]:
        return self.cascade_batch(batch) if cascade else self.student_batch(batch)

    def stream(self, batches: Iterable[Sequence[str]], cascade: bool = False,
               batch_size: int = 32, hold: int = 64) -> Iterator[list[dict[str, Any]]]:
        """The answers of each batch of `batches`, in order, like `predict`; with the cascade,
        the texts deferred by several batches are gathered until they make a full batch of
        `batch_size` for the teacher (it answers a handful per batch otherwise, at its slowest
        per text), holding at most `hold` batches back. File prediction streams through here."""
        if not cascade:
            for batch in batches:
                yield self.student_batch(batch)
            return
        student, teacher, measure, threshold = self.cascade
        pending: list[tuple[list[dict[str, Any]], np.ndarray]] = []
        waiting: list[str] = []

        def flush() -> Iterator[list[dict[str, Any]]]:
            answers = [a for start in range(0, len(waiting), batch_size)
                       for a in self.answers(softmax(teacher.logits(
                           waiting[start : start + batch_size])))]
            it = iter(answers)
            for rows, defer in pending:
                yield [{**(next(it) if d else a), "answered_by": "teacher" if d else "student",
                        "confidence": a["confidence"]} for a, d in zip(rows, defer, strict=True)]
            pending.clear()
            waiting.clear()

        for batch in batches:
            logits = student.logits(batch)
            conf = rule.confidence(logits, measure)
            defer = rule.deferred(logits, measure, threshold)
            rows = [{**a, "confidence": float(c)}
                    for a, c in zip(self.answers(softmax(logits)), conf, strict=True)]
            pending.append((rows, defer))
            waiting += [t for t, d in zip(batch, defer, strict=True) if d]
            if len(waiting) >= batch_size or len(pending) >= hold:
                yield from flush()
        if pending:
            yield from flush()


class Bundle:
    """A verified bundle: `predict` texts with the student, or with the cascade."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any], threads: int = 0):
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads
        self.labels: list[str] = read_json(self.folder / LABELS)["labels"]
        self.batch_size = int(manifest.get("batch_size", 32))
        self.model_name: str = manifest["model"]
        self.policy: dict[str, Any] | None = (read_json(self.folder / CASCADE)
                                              if manifest.get("cascade") else None)
        self._graphs: dict[str, Graph] = {}
        self._predictor: Predictor | None = None

    def graph(self, model: str) -> Graph:
        if model not in self._graphs:
            self._graphs[model] = Graph.load(self.folder, model, self.threads)
        return self._graphs[model]

    @property
    def model(self) -> Graph:
        # The manifest names its graphs, so a bundle stays loadable by a still that does not
        # know one of its system names.
        return self.graph(self.manifest.get("models", {}).get(self.model_name)
                          or MODEL_FILES[self.model_name])

    def predictor(self, cascade: bool = False) -> Predictor:
        """The bundle's `Predictor` (graphs load on first use; the cascade's when asked)."""
        if cascade and self.policy is None:
            raise BundleError(f"{self.folder}: this bundle has no cascade (built with "
                              "ship.cascade: false, or no threshold reached the target on "
                              "validation); predict without --cascade")
        if self._predictor is None or (cascade and self._predictor.cascade is None):
            p = self.policy
            self._predictor = Predictor(
                self.model, self.labels,
                (self.graph(p["student_file"]), self.graph(p["teacher_file"]),
                 p["confidence"], p["threshold"]) if cascade else None)
        return self._predictor

    def _batches(self, texts: Sequence[str], batch_size: int | None) -> Iterator[list[str]]:
        bs = batch_size or self.batch_size
        for i in range(0, len(texts), bs):
            yield list(texts[i : i + bs])

    def predict_proba(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Class probabilities of the default student, [len(texts), len(labels)]."""
        if not texts:
            return np.zeros((0, len(self.labels)))
        return np.concatenate([softmax(self.model.logits(b))
                               for b in self._batches(texts, batch_size)])

    def predict(self, texts: Sequence[str], cascade: bool = False,
                batch_size: int | None = None) -> list[dict[str, Any]]:
        """One `{"label", "probability"}` per text, in order; with `cascade`, the cascade
        student answers when its confidence reaches the threshold and the teacher otherwise
        (`answered_by`, and the student's `confidence`). Batches of `batch_size` (default: the
        deployment batch size evaluate measured, in bundle.json)."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        predictor = self.predictor(cascade)
        out: list[dict[str, Any]] = []
        for batch in self._batches(texts, batch_size):
            out += predictor.predict(batch, cascade)
        return out


def load_bundle(folder: str | Path, threads: int = 0, verify_files: bool = True) -> Bundle:
    """Load the bundle in `folder` (every file checked against bundle.json first).

    Args:
        folder: the bundle folder (`paths.bundle`, artifacts/bundle by default).
        threads: ONNX Runtime intra-op threads and the size of the `tokenizers` pool when it
            has not started yet in this process (0: their defaults, all cores).
        verify_files: check sha256 of every file (seconds for hundreds of MB); leave on
            unless the bundle was verified already.
    """
    manifest = verify(folder) if verify_files else read_json(Path(folder) / MANIFEST)
    pin_tokenizer_threads(threads)
    return Bundle(folder, manifest, threads)
