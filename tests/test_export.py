from pathlib import Path

import numpy as np
import pytest
import torch

from components.common import StageError
from components.export import ParityError, check_parity, export_onnx
from components.runtimes import ort_session as session
from components.textdata import pad_batch
from tests.test_distill import tiny_student


def test_dynamic_axes_and_parity_across_shapes(tmp_path):
    model = tiny_student()
    path = tmp_path / "m.onnx"
    export_onnx(model, pad_batch([[2, 5, 3]], 0), path, opset=17)
    sess = session(path)
    axes = {i.name: i.shape for i in sess.get_inputs()}
    assert axes == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    data = [pad_batch([[2, 5, 6, 7, 3]] * 3, 0), pad_batch([[2, 3], [2, 9, 9, 9, 9, 9, 3]], 0)]
    report = check_parity(model, sess, data, atol=1e-4, rtol=1e-3)
    assert report["max_abs_error"] < 1e-4 and report["batches"] == 2


def test_divergence_fails_naming_output_and_error(tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(tiny_student(), pad_batch([[2, 5, 3]], 0), path, opset=17)
    torch.manual_seed(123)
    other = tiny_student()  # different weights: the ONNX file no longer matches
    with pytest.raises(ParityError, match=r"'logits'.*max abs error"):
        check_parity(other, session(path), [pad_batch([[2, 5, 3]], 0)], atol=1e-4, rtol=1e-3)


def test_corrupt_onnx_file_is_named(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(StageError, match=r"model\.onnx cannot be loaded"):
        session(bad)


def test_export_stage_outputs(trained_pipeline):
    params, results = trained_pipeline
    out = Path(params.paths.export)
    m = results["export"]
    assert m["fp32"]["max_abs_error"] <= params.export.atol * 10
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    assert m["int8"]["bytes"] < m["fp32"]["bytes"]
    assert 0 <= m["int8"]["argmax_agreement"] <= 1
    sess = session(out / "model.onnx")
    ids, mask = pad_batch([[2, 5, 6, 3]] * 7, 0)
    logits = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert logits.shape == (7, 3) and np.isfinite(logits).all()


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_merging_student_with_feature_kd_distills_exports_and_evaluates(trained_pipeline,
                                                                        tmp_path, method):
    """The reduced student end to end on the cached teacher outputs: token merging plus pooled
    and per-layer feature distillation train, export to ONNX with parity (the export stage
    raises on a mismatch), and evaluate reports fewer FLOPs than the unmerged student."""
    from components import evaluate, export
    from components.config import apply_overrides, validate
    from components.distill import train as distill

    params, results = trained_pipeline
    raw = apply_overrides(params.to_dict(), {
        "paths.student": str(tmp_path / "student"),
        "paths.export": str(tmp_path / "export"),
        "paths.evaluate": str(tmp_path / "evaluate"),
        "paths.results": str(tmp_path / "results"),
        "distill.merge.method": method,
        "distill.merge.r": 4,
        "distill.feature.pooled_weight": 1.0,
        "distill.feature.hidden_weight": 1.0,
        "distill.feature.layer_map": {0: 2},
    })
    merged = validate(raw)
    d = distill.run(merged)
    assert d["merge_method"] == method and d["merge_layers"] == [0] and d["min_tokens"] == 10
    assert d["val_accuracy"] > 0.6
    e = export.run(merged)
    assert e["fp32"]["max_abs_error"] < merged.export.atol and e["min_tokens"] == 10
    sess = session(tmp_path / "export" / "model.onnx")
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]] * 2
    m = evaluate.run(merged)["systems"]
    plain = results["evaluate"]["systems"]
    assert m["student"]["accuracy"] == m["student_onnx"]["accuracy"]
    assert m["student"]["gflops_per_example"] < plain["student"]["gflops_per_example"]
    assert m["teacher"]["gflops_per_example"] == pytest.approx(
        plain["teacher"]["gflops_per_example"])


def test_ort_optimizer_option_keeps_parity(tmp_path):
    """export.ort_optimize: the fused graph still passes the parity check and INT8 export."""
    from components.config import Export
    from components.export import export_model

    torch.manual_seed(0)  # an untrained model: its argmax is arbitrary, so no agreement bound
    model = tiny_student()
    data = [pad_batch([[2, 5, 6, 7, 3]] * 3, 0), pad_batch([[2, 3], [2, 9, 9, 9, 9, 9, 3]], 0)]
    cfg = Export(ort_optimize=True)
    result = export_model(model, data, tmp_path, "m.onnx", "m.int8.onnx", cfg,
                          model.cfg.heads, model.cfg.hidden)
    assert "fused_ops" in result["ort_optimize"]
    assert result["fp32"]["max_abs_error"] < cfg.atol
    assert 0 <= result["int8"]["argmax_agreement"] <= 1 and (tmp_path / "m.int8.onnx").is_file()
    assert result["int8"]["bytes"] < result["fp32"]["bytes"]
