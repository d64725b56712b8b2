"""Rules that read beyond params.yaml: the teacher's layer count from its config.json, and the
feature layer map checked against it."""

from __future__ import annotations

import json
from pathlib import Path


def teacher_layer_count(folder: str | Path) -> int | None:
    """Transformer layers of the Hugging Face model in `folder` (its config.json), or None when
    the folder holds no readable config (a hub id, a teacher not trained yet)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):  # BERT-likes, GPT-2, T5
        if isinstance(config.get(key), int):
            return config[key]
    return None


def layer_map_problem(layer_map: dict[int, int], teacher_layers: int, teacher: str) -> str | None:
    """`distill.feature.layer_map` values index the teacher's hidden states: 0 is the embedding
    output, 1..teacher_layers its transformer layers."""
    bad = sorted({t for t in layer_map.values() if not 0 <= t <= teacher_layers})
    if not bad:
        return None
    return (f"distill.feature.layer_map: teacher layers {bad} outside 0..{teacher_layers} "
            f"(the teacher in {teacher} has {teacher_layers} layers; 0 = embeddings)")
