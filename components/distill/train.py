"""distill: train the student on the domain tokenizer against the cached teacher logits.

Loss: alpha * T^2 * KL(teacher soft labels || student) + (1 - alpha) * CE(labels), plus
optional feature terms (`distill.feature`: pooled / per-layer hidden-state matching through
learned projections, see `losses.FeatureDistillationLoss`), trained with the shared Lightning
loop (checkpointing, early stopping on validation loss, progress
bar, W&B). The teacher is never run here: its logits come from `paths.teacher_outputs`.

Produces in `paths.student`: `model.safetensors`, `config.json` (architecture),
`tokenizer.json` (copy of the domain tokenizer, so the folder is self-contained),
`metrics.json` and `params.json`.

Run: `python -m components.distill` (or `dvc repro distill`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from components.artifacts import (
    TOKENIZER_FILE,
    load_label_names,
    load_split,
    load_teacher_outputs,
    load_tokenizer,
)
from components.common import StageError, atomic_dir, stage_main, write_json
from components.config import Params, layer_map_problem, teacher_layer_count
from components.distill.losses import DistillationLoss, FeatureDistillationLoss
from components.models.student import Student, StudentConfig, save
from components.textdata import EncodedDataset, TextDataModule, encode, pad_id
from components.training import ClassifierModule, configure_torch, fit


def build_student(params: Params, vocab_size: int, num_labels: int, pad: int) -> Student:
    d, m = params.distill, params.distill.merge
    return Student(StudentConfig(
        vocab_size=vocab_size, num_labels=num_labels, max_length=d.max_length, layers=d.layers,
        hidden=d.hidden, heads=d.heads, intermediate=d.intermediate, dropout=d.dropout,
        pooling=d.pooling, pad_id=pad, merge_method=m.method, merge_r=m.r,
        merge_layers=tuple(m.layers), protect_first=m.protect_first,
        proportional_attention=m.proportional_attention, pitome_margin=m.pitome_margin,
        pitome_alpha=m.pitome_alpha,
    ))


def build_loss(params: Params, teacher_hidden: int):
    d, f = params.distill, params.distill.feature
    kd = DistillationLoss(d.temperature, d.alpha)
    if not (f.pooled_weight or f.hidden_weight):
        return kd
    return FeatureDistillationLoss(kd, d.hidden, teacher_hidden, f.pooled_weight,
                                   f.hidden_weight, f.layer_map)


def check_layer_map(params: Params, teacher_layers: int | None) -> None:
    """Stop before any work when `distill.feature.layer_map` names a teacher layer that does
    not exist (params validation cannot know the teacher's depth)."""
    if teacher_layers is None:
        return
    problem = layer_map_problem(params.distill.feature.layer_map, teacher_layers,
                                params.paths.teacher)
    if problem:
        raise StageError(problem)


def run(params: Params) -> dict:
    cfg = params.distill
    check_layer_map(params, teacher_layer_count(params.paths.teacher))
    configure_torch(params)
    tok = load_tokenizer(params.paths)
    pad = pad_id(tok)
    labels = load_label_names(params.paths)
    teacher = load_teacher_outputs(params.paths)
    data = {}
    # The cached outputs hold the embeddings + every layer: the same check, in case they
    # disagree with the teacher's config.json.
    check_layer_map(params, teacher["train_layers"].shape[1] - 1)
    for split in ("train", "validation"):
        frame = load_split(params.paths, split)
        targets = {"teacher_logits": teacher[f"{split}_logits"]}
        if cfg.feature.pooled_weight or cfg.feature.hidden_weight:
            targets["teacher_layers"] = teacher[f"{split}_layers"]
        data[split] = EncodedDataset(encode(tok, frame["text"], cfg.max_length),
                                     frame["label"].to_numpy(), targets)

    model = build_student(params, tok.get_vocab_size(), len(labels), pad)
    loss = build_loss(params, teacher["train_layers"].shape[-1])
    module = ClassifierModule(model, loss, cfg.lr, cfg.weight_decay, cfg.warmup_ratio)
    dm = TextDataModule(data["train"], data["validation"], cfg.batch_size, pad, params.seed,
                        min_length=model.cfg.min_tokens())
    checkpoints = Path(params.paths.student).with_name(".checkpoints-student")
    val = fit(module, dm, params, "distill", cfg.epochs, checkpoints, patience=cfg.patience)

    metrics = {
        "val_accuracy": val["val/acc"],
        "val_loss": val["val/loss"],
        "val_teacher_agreement": val["val/teacher_agreement"],
        "epochs_trained": val["epochs_trained"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "merge_method": params.distill.merge.method,
        "merge_layers": model.cfg.merging_layers(),
        "min_tokens": model.cfg.min_tokens(),
    }
    with atomic_dir(params.paths.student, params, "distill") as out:
        save(model.eval(), out)
        shutil.copyfile(Path(params.paths.tokenizer) / TOKENIZER_FILE, out / TOKENIZER_FILE)
        write_json(out / "metrics.json", metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"distill: student {metrics['parameters']:,} params, validation accuracy "
          f"{metrics['val_accuracy']:.4f}, agreement with teacher "
          f"{metrics['val_teacher_agreement']:.4f}")
    return metrics


def main() -> None:
    stage_main("distill", run)


if __name__ == "__main__":
    main()
