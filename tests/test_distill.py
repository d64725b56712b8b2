import torch

from components.models.losses import DistillationLoss, kd_kl
from components.models.student import Student, StudentConfig, load, save
from components.text.tensors import pad_batch


def tiny_student(**kw):
    cfg = dict(vocab_size=50, num_labels=3, max_length=16, layers=2, hidden=16, heads=2,
               intermediate=32, dropout=0.0)
    return Student(StudentConfig(**{**cfg, **kw})).eval()


def test_kd_is_zero_for_identical_logits_and_scales_with_t_squared():
    logits = torch.randn(4, 3)
    assert kd_kl(logits, logits, 2.0).abs() < 1e-6
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    # With T large, KL/T^2 ... the T^2 factor keeps magnitudes comparable: check the formula.
    p_t = torch.softmax(t / 3, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 3, -1))).sum(-1).mean() * 9
    assert torch.allclose(kd_kl(s, t, 3.0), manual, atol=1e-5)


def test_distillation_loss_mixes_terms():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    batch = {"labels": torch.tensor([0, 1, 2, 0]), "teacher_logits": t}
    loss, parts = DistillationLoss(2.0, 0.25)(s, batch)
    assert torch.allclose(loss, 0.25 * parts["kd"] + 0.75 * parts["ce"])
    only_ce, _ = DistillationLoss(2.0, 0.0)(s, batch)
    assert torch.allclose(only_ce, parts["ce"])


def test_padding_does_not_change_logits():
    model = tiny_student()
    ids, mask = pad_batch([[2, 7, 9, 3]], 0)
    padded, pmask = pad_batch([[2, 7, 9, 3], [2, 5, 6, 8, 10, 11, 12, 3]], 0)
    for pooling in ("cls", "mean"):
        model = tiny_student(pooling=pooling)
        torch.manual_seed(0)
        alone = model(ids, mask)
        batched = model(padded, pmask)[:1]
        assert torch.allclose(alone, batched, atol=1e-5), pooling


def test_save_load_roundtrip_is_exact(tmp_path):
    model = tiny_student()
    save(model, tmp_path)
    again = load(tmp_path)
    ids, mask = pad_batch([[2, 4, 6, 3]], 0)
    assert torch.equal(model(ids, mask), again(ids, mask))


def test_distill_stage_learns_and_agrees_with_teacher(trained_pipeline):
    params, results = trained_pipeline
    m = results["distill"]
    assert m["val_accuracy"] > 0.6  # 3 classes: chance is 1/3
    assert m["val_teacher_agreement"] > 0.6
    assert m["parameters"] < results["teacher"]["parameters"] * 10
    assert results["teacher"]["finetuned"] is True
    assert results["teacher"]["val_accuracy"] > 0.6


def test_feature_distillation_decreases_every_term():
    """A tiny student with token merging, trained against fixed teacher logits and hidden
    states: the logit KD, the pooled and the per-layer feature terms all go down, and the
    learned projections (which live in the loss, not the model) are what make that possible."""
    from components.models.losses import FeatureDistillationLoss

    torch.manual_seed(0)
    model = tiny_student(merge_method="tome", merge_r=1).train()
    teacher_hidden = 24
    loss_fn = FeatureDistillationLoss(DistillationLoss(2.0, 0.5), 16, teacher_hidden,
                                      pooled_weight=1.0, hidden_weight=1.0, layer_map={0: 1, 1: 2})
    ids, mask = pad_batch([[2, *torch.randint(4, 50, (n,)).tolist(), 3] for n in range(3, 11)], 0)
    batch = {"labels": torch.arange(8) % 3, "teacher_logits": torch.randn(8, 3) * 3,
             "teacher_layers": torch.randn(8, 3, teacher_hidden)}  # embeddings + 2 layers
    params = list(model.parameters()) + list(loss_fn.parameters())
    assert len(list(loss_fn.parameters())) == 6  # pooled + 2 layer projections, weight + bias
    opt = torch.optim.AdamW(params, lr=1e-2)
    history = []
    for _ in range(80):
        loss, parts = loss_fn(model.features(ids, mask), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"total": loss.item(), **{k: v.item() for k, v in parts.items()}})
    assert set(history[0]) == {"total", "ce", "kd", "feature_pooled", "feature_hidden"}
    for term in ("total", "kd", "feature_pooled", "feature_hidden"):
        assert history[-1][term] < 0.5 * history[0][term], (term, history[0], history[-1])


def test_features_are_per_layer_size_weighted_means():
    """`features()` gives logits, the final pooled vector and one mean-pooled vector per layer
    (embeddings first); with merging on, sizes keep the means over the original tokens."""
    model = tiny_student(merge_method="tome", merge_r=2)
    ids, mask = pad_batch([[2, 7, 9, 11, 13, 15, 3], [2, 5, 3]], 0)
    logits, pooled, layers = model.features(ids, mask)
    assert logits.shape == (2, 3) and layers.shape == (2, 3, 16) and pooled.shape[0] == 2
    assert torch.allclose(logits, model(ids, mask), atol=1e-6)
    # Padding does not leak into the pooled features either.
    alone = model.features(*pad_batch([[2, 5, 3]], 0, model.cfg.min_tokens()))[2]
    assert torch.allclose(alone[0], layers[1], atol=1e-5)


def test_unusable_lightning_strategy_is_a_clear_stage_error(tmp_path, dataset_csv, tiny_teacher):
    """trainer.strategy / num_nodes go to Lightning as they are; one Lightning cannot use here
    fails before any training with the trainer params named."""
    import pytest

    from components.config import validate
    from components.stage import StageError
    from components.training.fit import ClassifierModule, cross_entropy, fit
    from tests.conftest import tiny_raw_params

    raw = tiny_raw_params(tmp_path, dataset_csv, tiny_teacher,
                          **{"trainer.strategy": "no_such_strategy", "tracking.mode": "disabled"})
    params = validate(raw)
    assert params.trainer.num_nodes == 1
    module = ClassifierModule(tiny_student(), cross_entropy, 1e-3, 0.0, 0.0)
    with pytest.raises(StageError, match=r"strategy='no_such_strategy'.*not usable here"):
        fit(module, None, params, "distill", 1, tmp_path / "ckpt")
