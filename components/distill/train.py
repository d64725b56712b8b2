"""distill: train the student on the domain tokenizer against the cached teacher logits.

Loss: alpha * T^2 * KL(teacher soft labels || student) + (1 - alpha) * CE(labels), plus
optional feature terms (`distill.feature`: pooled / per-layer hidden-state matching through
learned projections, see `losses.FeatureDistillationLoss`), trained with the shared Lightning
loop (checkpointing, early stopping on validation loss, progress
bar, W&B). The teacher is never run here: its logits come from `paths.teacher_outputs` (the
teacher_cache stage), for the training examples and, with `distill.windows`, for the word windows of
every training text it labelled (TinyBERT-style augmentation: the student learns from all of
each text, not only from its first `max_length` tokens).

Produces in `paths.student`: `model.safetensors`, `config.json` (architecture),
`tokenizer.json` (copy of the domain tokenizer, so the folder is self-contained),
`metrics.json` and `params.json`.

Run: `python -m components.distill` (or `dvc repro distill`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from components.config import Params, layer_map_problem, teacher_layer_count
from components.data.artifacts import (
    TOKENIZER_FILE,
    iter_parquet,
    iter_split_texts,
    load_label_names,
    load_split,
    load_split_labels,
    load_teacher_outputs,
    load_tokenizer,
    read_labels,
    windows_path,
)
from components.data.files import atomic_dir, reading, write_json
from components.evaluation.flops import encoder_flops
from components.evaluation.stats import Bootstrap
from components.models.losses import DistillationLoss, FeatureDistillationLoss
from components.models.runtimes import TextEncoder, torch_runner
from components.models.student import Student, StudentConfig, from_teacher, save, spread_layers
from components.stage import StageError, stage_main
from components.text.batches import Stacked, TokenIds, encode_batches
from components.text.encoding import pad_id
from components.text.tensors import EncodedDataset, TextDataModule
from components.training.fit import ClassifierModule, configure_torch, fit

VALIDATION_RESAMPLES = 1000  # bootstrap resamples for the validation interval (seeded)


def build_student(params: Params, vocab_size: int, num_labels: int, pad: int) -> Student:
    """The student `distill.init` asks for: a new one (scratch) or one copied from the
    teacher's layers (`student.from_teacher`; its vocabulary is the teacher's)."""
    d, m = params.distill, params.distill.merge
    settings = dict(
        num_labels=num_labels, max_length=d.max_length, dropout=d.dropout, pooling=d.pooling,
        pad_id=pad, merge_method=m.method, merge_r=m.r, merge_layers=tuple(m.layers),
        protect_first=m.protect_first, proportional_attention=m.proportional_attention,
        pitome_margin=m.pitome_margin, pitome_alpha=m.pitome_alpha)
    if d.init == "teacher":
        teacher_layers = teacher_layer_count(params.paths.teacher)
        layers = d.teacher_layers or spread_layers(teacher_layers or d.layers, d.layers)
        return from_teacher(params.paths.teacher, layers, **settings)
    return Student(StudentConfig(vocab_size=vocab_size, layers=d.layers, hidden=d.hidden,
                                 heads=d.heads, intermediate=d.intermediate, **settings))


def student_tokenizer(params: Params) -> tuple[Tokenizer, Path]:
    """The domain tokenizer, or the teacher's own for a student copied from the teacher, and
    the file it came from (copied into the student's folder)."""
    if params.distill.init == "scratch":
        return load_tokenizer(params.paths), Path(params.paths.tokenizer) / TOKENIZER_FILE
    path = Path(params.paths.teacher) / TOKENIZER_FILE
    if not path.is_file():
        raise StageError(f"{path} not found: distill.init: teacher needs the teacher stage's "
                         "fast tokenizer (dvc repro teacher)")
    with reading(path, "the teacher's tokenizer", "rerun the teacher stage (dvc repro -f "
                                                  "teacher)"):
        return Tokenizer.from_file(str(path)), path


def build_loss(params: Params, student_hidden: int, teacher_hidden: int):
    d, f = params.distill, params.distill.feature
    kd = DistillationLoss(d.temperature, d.alpha)
    if not (f.pooled_weight or f.hidden_weight):
        return kd
    return FeatureDistillationLoss(kd, student_hidden, teacher_hidden, f.pooled_weight,
                                   f.hidden_weight, f.layer_map)


def teacher_targets(teacher: dict[str, np.ndarray], name: str,
                    features: bool) -> dict[str, np.ndarray]:
    """The cached teacher outputs a student trains against, for a split or "windows"
    (memory maps: an example's row is read when a batch needs it)."""
    targets = {"teacher_logits": teacher[f"{name}_logits"]}
    if features:
        targets["teacher_layers"] = teacher[f"{name}_layers"]
    return targets


def encode_split(params: Params, tok: Tokenizer, split: str) -> tuple[TokenIds, np.ndarray]:
    """A split's token ids and labels, read batch by batch: memory holds int32 ids, never the
    texts of the whole split."""
    labels = load_split_labels(params.paths, split)
    ids = encode_batches(tok, iter_split_texts(params.paths, split), params.distill.max_length)
    return ids, labels


def with_windows(params: Params, tok: Tokenizer, train: tuple,
                 teacher: dict[str, np.ndarray], features: bool) -> tuple:
    """The training examples followed by the training windows the teacher_cache stage labelled."""
    path = windows_path(params.paths)
    if path is None or "windows_logits" not in teacher:
        raise StageError(
            f"distill.windows.enabled is true but {params.paths.teacher_outputs} holds no "
            "labelled windows: rerun the teacher_cache stage (dvc repro teacher_cache)")
    what = "the labelled training windows"
    fix = "rerun the teacher_cache stage (dvc repro -f teacher_cache)"
    labels = read_labels(path, what, fix)
    extra = teacher_targets(teacher, "windows", features)
    if len(labels) != len(extra["teacher_logits"]):
        raise StageError(
            f"{params.paths.teacher_outputs}: {len(labels)} windows but "
            f"{len(extra['teacher_logits'])} cached teacher outputs; rerun the teacher_cache stage "
            "(dvc repro -f teacher_cache)")
    ids = encode_batches(tok, (f["text"].tolist() for f in iter_parquet(path, ["text"], what,
                                                                       fix)),
                         params.distill.max_length)
    train_ids, train_labels, targets = train
    return (TokenIds.concat([train_ids, ids]), np.concatenate([train_labels, labels]),
            {k: Stacked([v, extra[k]]) for k, v in targets.items()})


def check_layer_map(params: Params, teacher_layers: int | None) -> None:
    """Stop before any work when `distill.feature.layer_map` names a teacher layer that does
    not exist (params validation cannot know the teacher's depth)."""
    if teacher_layers is None:
        return
    problem = layer_map_problem(params.distill.feature.layer_map, teacher_layers,
                                params.paths.teacher)
    if problem:
        raise StageError(problem)


def score_validation(params: Params, model, tok: Tokenizer, num_labels: int,
                     teacher: dict[str, np.ndarray]) -> dict:
    """The trained student on the validation split, as a search trial is judged (never test):
    accuracy with its seeded bootstrap interval, the teacher's accuracy from its cached logits,
    the drop in points with its paired interval, and the cost parallel trials cannot distort:
    GFLOPs per example at the real token counts (merging included) and parameters."""
    frame = load_split(params.paths, "validation")
    texts, labels = frame["text"].tolist(), frame["label"].to_numpy()
    encoder = TextEncoder(tok, params.distill.max_length, model.cfg.min_tokens())
    run, bs = torch_runner(model), params.distill.batch_size
    preds = np.concatenate([run(*encoder(texts[i : i + bs]))
                            for i in range(0, len(texts), bs)]).argmax(-1)
    reference = np.asarray(teacher["validation_logits"]).argmax(-1)
    boot = Bootstrap(labels, num_labels, VALIDATION_RESAMPLES, params.seed)
    drop = boot.difference(reference, preds)
    cfg = model.cfg
    merge = {layer: cfg.merge_r for layer in cfg.merging_layers()}
    tokens = [len(x) for x in encoder.ids(texts)]
    flops = [encoder_flops(n, cfg.layers, cfg.hidden, cfg.intermediate, cfg.num_labels, merge)
             for n in tokens]
    return {"validation": {"accuracy": float((preds == labels).mean()),
                           "accuracy_ci": boot.scores(preds)["accuracy_ci"],
                           "teacher_accuracy": float((reference == labels).mean()),
                           "drop_pt": 100 * drop["accuracy_diff"],
                           "drop_ci_pt": [100 * x for x in drop["accuracy_diff_ci"]],
                           "examples": len(labels)},
            "gflops_per_example": float(np.mean(flops)) / 1e9,
            "tokens_per_example": float(np.mean(tokens))}


def run(params: Params) -> dict:
    cfg = params.distill
    check_layer_map(params, teacher_layer_count(params.paths.teacher))
    configure_torch(params)
    tok, tok_file = student_tokenizer(params)
    pad = pad_id(tok)
    labels = load_label_names(params.paths)
    teacher = load_teacher_outputs(params.paths)
    # The cached outputs hold the embeddings + every layer: the same check, in case they
    # disagree with the teacher's config.json.
    check_layer_map(params, teacher["train_layers"].shape[1] - 1)
    features = bool(cfg.feature.pooled_weight or cfg.feature.hidden_weight)
    data = {}
    for split in ("train", "validation"):
        ids, y = encode_split(params, tok, split)
        data[split] = (ids, y, teacher_targets(teacher, split, features))
    if cfg.windows.enabled:
        data["train"] = with_windows(params, tok, data["train"], teacher, features)
    data = {split: EncodedDataset(ids, y, targets)
            for split, (ids, y, targets) in data.items()}

    model = build_student(params, tok.get_vocab_size(), len(labels), pad)
    loss = build_loss(params, model.cfg.hidden, teacher["train_layers"].shape[-1])
    module = ClassifierModule(model, loss, cfg.lr, cfg.weight_decay, cfg.warmup_ratio)
    dm = TextDataModule(data["train"], data["validation"], cfg.batch_size, pad, params.seed,
                        min_length=model.cfg.min_tokens())
    checkpoints = Path(params.paths.student).with_name(".checkpoints-student")
    val = fit(module, dm, params, "distill", cfg.epochs, checkpoints, patience=cfg.patience)

    metrics = {
        **score_validation(params, model, tok, len(labels), teacher),
        "val_accuracy": val["val/acc"],
        "val_loss": val["val/loss"],
        "val_teacher_agreement": val["val/teacher_agreement"],
        "epochs_trained": val["epochs_trained"],
        "train_examples": len(data["train"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "init": cfg.init,
        "merge_method": params.distill.merge.method,
        "merge_layers": model.cfg.merging_layers(),
        "min_tokens": model.cfg.min_tokens(),
    }
    with atomic_dir(params.paths.student, params, "distill") as out:
        save(model.eval(), out)
        shutil.copyfile(tok_file, out / TOKENIZER_FILE)
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
