"""Shared fixtures: the production params.yaml shrunk onto tiny data and a tiny teacher that the
tests make themselves (no downloads, seconds per stage)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.config import Paths, apply_overrides, validate

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

CLASS_WORDS = {
    "sport": [
        "match",
        "goal",
        "team",
        "striker",
        "league",
        "coach",
        "referee",
        "score",
        "penalty",
        "season",
        "win",
    ],
    "tech": [
        "software",
        "chip",
        "network",
        "server",
        "code",
        "cloud",
        "data",
        "robot",
        "laptop",
        "startup",
        "phone",
    ],
    "food": [
        "recipe",
        "bread",
        "cheese",
        "kitchen",
        "chef",
        "spice",
        "tomato",
        "soup",
        "bake",
        "dinner",
        "flavour",
    ],
}
FILLER = ["the", "a", "of", "and", "in", "on", "with", "for", "today", "this", "new", "big"]


def make_examples(per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Short sentences whose topic words give the label away, padded with shared filler."""
    rng = random.Random(seed)
    rows = []
    for label, words in CLASS_WORDS.items():
        for _ in range(per_class):
            n = rng.randint(4, 14)
            tokens = [
                rng.choice(words) if rng.random() < 0.6 else rng.choice(FILLER) for _ in range(n)
            ]
            rows.append({"text": " ".join(tokens), "label": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def dataset_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    make_examples(per_class=100).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def make_tiny_teacher(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer, saved as a Hugging Face folder.
    It is a bare encoder (no classification head), like the default teacher."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from components.tokenizer import train

    texts = make_examples(per_class=60, seed=1)["text"].tolist()
    tok = train(texts, "wordpiece", vocab_size=200, min_frequency=1)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    hf_tok.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


TINY_OVERRIDES = {
    "trainer.num_threads": 1,
    "tokenizer.type": "wordpiece",  # byte-level BPE (the default) needs > 261 tokens
    "tokenizer.vocab_size": 120,
    "tokenizer.min_frequency": 1,
    "teacher.epochs": 30,
    "teacher.batch_size": 16,
    "teacher.lr": 1.0e-3,
    "teacher.max_length": 32,
    "distill.layers": 1,
    "distill.hidden": 32,
    "distill.heads": 2,
    "distill.intermediate": 64,
    "distill.max_length": 32,
    "distill.epochs": 15,
    "distill.batch_size": 16,
    "distill.lr": 1.0e-2,
    "distill.patience": 5,
    # The default student merges tokens (ToMe); tiny texts of a few tokens are checked without
    # it, and test_merging.py covers merging through training, export and parity.
    "distill.merge.method": "none",
    "distill.merge.r": 0,
    "export.parity_batches": 2,
    "export.parity_batch_size": 4,
    "evaluate.latency_examples": 5,
    "evaluate.warmup": 1,
    "evaluate.min_pass_seconds": 0,
    "evaluate.throughput_batch_size": 8,
    "evaluate.num_threads": 1,
}


def tiny_raw_params(workdir: Path | None, dataset: Path, teacher: Path, **extra) -> dict:
    """The production params.yaml with tiny sizes, tiny data and teacher. With `workdir`, for
    params built in code: every output location (`config.Paths`) moved under it, as a `paths`
    mapping. Without, a params.yaml for a project (a DVC repo, a stage run as DVC runs it): no
    `paths`, the outputs go where dvc.yaml puts them (a `paths.x` in `extra` is kept, for tests
    of its refusal)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = {
        **TINY_OVERRIDES,
        "prepare.source": str(dataset),
        "prepare.format": "auto",
        "teacher.model": str(teacher),
        "tracking.mode": "offline",
        **extra,
    }
    if workdir:
        raw["paths"] = {k: str(workdir / v) for k, v in Paths().model_dump().items()}
    return apply_overrides(raw, overrides)


@pytest.fixture
def tiny_params(tmp_path, dataset_csv, tiny_teacher):
    return validate(tiny_raw_params(tmp_path, dataset_csv, tiny_teacher))


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory, dataset_csv, tiny_teacher):
    """Run every stage in process once on tiny params; tests read the outputs."""
    from components import (
        evaluate,
        export,
        prepare,
        ship,
        source,
        teacher,
        teacher_cache,
        tokenizer,
    )
    from components.distill import train as distill

    workdir = tmp_path_factory.mktemp("pipeline")
    params = validate(tiny_raw_params(workdir, dataset_csv, tiny_teacher))
    results = {}
    for name, stage in [
        ("source", source),
        ("prepare", prepare),
        ("tokenizer", tokenizer),
        ("teacher", teacher),
        ("teacher_cache", teacher_cache),
        ("distill", distill),
        ("export", export),
        ("evaluate", evaluate),
        ("ship", ship),
    ]:
        results[name] = stage.run(params)
    return params, results


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    """A real S3 API on localhost (moto's server mode, standing in for MinIO/S3): its endpoint
    URL, with throwaway credentials only in this test's environment."""
    moto_server = pytest.importorskip("moto.server", reason="pip install 'still[dev]' (moto)")
    pytest.importorskip("dvc_s3", reason="pip install 'still[s3]' (dvc-s3)")
    for key, value in {"AWS_ACCESS_KEY_ID": "still-test", "AWS_SECRET_ACCESS_KEY": "still-test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@still.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@still.invalid",
}
os.environ.update({k: os.environ.get(k, v) for k, v in GIT_ENV.items()})


def sh(cmd: list[str], cwd: Path) -> str:
    """Run a command with this venv first on PATH (DVC stage commands call `python`)."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def make_dvc_repo(repo: Path, dataset: Path, teacher: Path) -> Path:
    """A git + DVC repo holding this project's pipeline (components, dvc.yaml) and a tiny
    params.yaml, committed."""
    import shutil
    import sys

    repo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "components", repo / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    raw = tiny_raw_params(None, dataset, teacher)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n/artifacts/wandb/\n")
    dvc = [sys.executable, "-m", "dvc"]
    sh(["git", "init", "-q", "-b", "main"], repo)
    sh([*dvc, "init", "-q"], repo)
    sh([*dvc, "config", "core.analytics", "false"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    return repo
