"""label: run the fine-tuned teacher once over everything the students learn from.

Produces in `paths.teacher_outputs`: `outputs.npz` with, for every split, the teacher's logits
(`<split>_logits`) and the mean-pooled hidden states of its embeddings and every layer
(`<split>_layers`, [n, layers + 1, hidden], for feature distillation); with `distill.windows`
enabled also the same for every training window (`windows_logits`, `windows_layers`) and the
windows themselves (`windows.parquet`: text, source row in the train split, label). Plus
`metrics.json` (the teacher's accuracy per split, window counts) and `params.json`.

The windows are what TinyBERT-style augmentation adds: the default articles are about four
times longer than the 128 tokens a model reads, so each training text is sliced into word
windows (`textdata.text_windows`) that the teacher labels here, once, for any number of
students. A separate stage from `teacher`, so that changing the windows never fine-tunes the
teacher again.

Run: `python -m components.label` (or `dvc repro label`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from components.artifacts import SPLITS, load_label_names, load_split, write_teacher_outputs
from components.common import StageError, atomic_dir, stage_main, write_json
from components.config import Params
from components.models.teacher import load_saved, predict_outputs
from components.textdata import encode, pad_id, text_windows


def run(params: Params) -> dict:
    cfg, win = params.teacher, params.distill.windows
    torch.set_num_threads(params.trainer.num_threads)
    labels = load_label_names(params.paths)
    frames = {s: load_split(params.paths, s) for s in SPLITS}  # checked before any model work
    model, hf_tok = load_saved(params.paths.teacher)
    if model.hf.config.num_labels != len(labels):
        raise StageError(
            f"the teacher in {params.paths.teacher} has {model.hf.config.num_labels} labels but "
            f"the data has {len(labels)} ({labels}): rerun the teacher stage (dvc repro teacher)")
    backend, pad = hf_tok.backend_tokenizer, pad_id(hf_tok.backend_tokenizer)
    outputs, metrics = {}, {}
    for split, frame in frames.items():
        ids = encode(backend, frame["text"], cfg.max_length)
        outputs[split] = predict_outputs(model, ids, cfg.eval_batch_size, pad,
                                         progress=f"label: teacher on {split}")
        metrics[f"{split}_accuracy"] = float(
            (outputs[split][0].argmax(-1) == frame["label"].to_numpy()).mean())
    windows = None
    if win.enabled:
        train = frames["train"]
        texts, source = text_windows(train["text"].tolist(), win.words, win.stride,
                                     win.max_per_text)
        windows = pd.DataFrame({"text": texts, "source": source,
                                "label": train["label"].to_numpy()[source]})
        if texts:
            ids = encode(backend, texts, cfg.max_length)
            outputs["windows"] = predict_outputs(model, ids, cfg.eval_batch_size, pad,
                                                 progress="label: teacher on training windows")
            agree = outputs["windows"][0].argmax(-1) == windows["label"].to_numpy()
            metrics["windows_label_agreement"] = float(agree.mean())
        else:
            hidden = outputs["train"][1].shape[1:]
            outputs["windows"] = (np.zeros((0, len(labels)), np.float32),
                                  np.zeros((0, *hidden), np.float32))
        metrics["windows"] = len(texts)
        metrics["windows_per_text"] = len(texts) / max(1, len(train))
    with atomic_dir(params.paths.teacher_outputs, params, "label") as out:
        write_teacher_outputs(out, outputs, windows)
        write_json(out / "metrics.json", metrics)
    extra = (f", {metrics['windows']} training windows (teacher agrees with the text's label "
             f"on {metrics.get('windows_label_agreement', 0):.4f})" if win.enabled else "")
    print(f"label: teacher outputs cached for {', '.join(SPLITS)}{extra}")
    return metrics


def main() -> None:
    stage_main("label", run)


if __name__ == "__main__":
    main()
