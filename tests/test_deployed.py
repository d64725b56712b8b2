"""The deployed path: the bundle's Predictor, used by `still predict`, `load_bundle(...).predict`
and evaluate's timing of the deployed path, streams batches with the cascade's deferred texts
gathered into full teacher batches, and answers exactly what it answers batch by batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.serving.bundle import load_bundle


def test_streamed_cascade_answers_what_batch_by_batch_prediction_answers(trained_pipeline):
    params, _ = trained_pipeline
    bundle = load_bundle(params.paths.bundle)
    if bundle.policy is None:
        pytest.skip("the tiny pipeline chose no cascade threshold")
    from components.data.artifacts import load_split

    texts = load_split(params.paths, "test")["text"].tolist() * 3
    batches = [texts[i : i + 5] for i in range(0, len(texts), 5)]
    predictor = bundle.predictor(cascade=True)
    # Threshold 1: every text goes to the teacher, so the gathering crosses many batches.
    for threshold in (bundle.policy["threshold"], 1.0):
        predictor.cascade = (*predictor.cascade[:3], threshold)
        one_by_one = [predictor.predict(b, cascade=True) for b in batches]
        for hold in (1, 3, 64):
            streamed = list(predictor.stream(batches, cascade=True, batch_size=8, hold=hold))
            assert len(streamed) == len(one_by_one)
            for got, want in zip(streamed, one_by_one, strict=True):
                # Dynamic INT8 scales activations per batch, padding included, so the teacher's
                # probabilities move a little with the company a text keeps; answers do not.
                assert [(a["label"], a["answered_by"], a["confidence"]) for a in got] == [
                    (a["label"], a["answered_by"], a["confidence"]) for a in want]
                assert [a["probability"] for a in got] == pytest.approx(
                    [a["probability"] for a in want], abs=0.02)
    assert list(predictor.stream(batches)) == [predictor.predict(b) for b in batches]


def test_the_tokenizers_pool_takes_the_pinned_size():
    """RAYON_NUM_THREADS, set before the first parallel `tokenizers` call
    (encoding.pin_tokenizer_threads), sizes the pool it trains and encodes on: the process holds
    3 more threads with 4 pinned than with 1."""
    code = """
import os, sys, threading
from components.text.encoding import Encoder, pin_tokenizer_threads
from components.tokenizer import train
pin_tokenizer_threads(int(sys.argv[1]))
tok = train(["alpha beta gamma delta"] * 50, "wordpiece", 60, 1)
Encoder(tok, 8).ids(["alpha beta gamma delta epsilon " * 20] * 256)
print(len(os.listdir("/proc/self/task")))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    threads_seen = {}
    for threads in (1, 4):
        out = subprocess.run([sys.executable, "-c", code, str(threads)], env=env,
                             capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert out.returncode == 0, out.stderr
        threads_seen[threads] = int(out.stdout.strip().splitlines()[-1])
    assert threads_seen[4] - threads_seen[1] == 3, threads_seen
