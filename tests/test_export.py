from pathlib import Path

import numpy as np
import pytest
import torch

from components.exporting.onnx_export import export_onnx
from components.exporting.parity import ParityError, check_parity
from components.models.runtimes import ort_session as session
from components.stage import StageError
from components.text.tensors import pad_batch
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
    from components.exporting.onnx_export import export_model

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


# --------------------------------------------------------------------------- static INT8


def _feeds(batches):
    return [{"input_ids": ids.numpy(), "attention_mask": mask.numpy()} for ids, mask in batches]


def _rounded_float_inputs(graph, float_ops) -> list[str]:
    """Float-op nodes reading DQ(Q(t)) of a tensor t computed in float: an input rounded to 8
    bits. A DQ of an int8 producer's output (an embedding Gather) is exact and allowed."""
    producer = {o: n for n in graph.node for o in n.output}
    bad = []
    for node in graph.node:
        if node.op_type not in float_ops:
            continue
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
                else None
            if q is not None and q.op_type == "QuantizeLinear":
                source = producer.get(q.input[0])
                if source is None or source.op_type in float_ops or source.op_type in (
                        "MatMul", "Gemm"):
                    bad.append(f"{node.op_type} {node.name} reads {name}")
    return bad


def _weight_scales(graph) -> list[int]:
    """Element counts of the scales of every dequantised weight (initializer) tensor."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    return [int(np.prod(numpy_helper.to_array(inits[n.input[1]]).shape) or 1)
            for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type in (2, 3)]  # uint8/int8 weights


def test_static_int8_graphs_are_exported_and_agree_with_fp32(trained_pipeline):
    """Both sides: a Q/DQ graph with per-channel weights, calibrated on train texts, its
    agreement with FP32 measured on every validation text (none of which calibrated it), run by
    ORT at other batch sizes and lengths, predicting (nearly) what FP32 predicts on test."""
    import onnx

    from components.data.artifacts import load_split
    from components.models.runtimes import TextEncoder

    params, results = trained_pipeline
    out = Path(params.paths.export)
    cfg = params.export.static_int8
    texts = load_split(params.paths, "test")["text"].tolist()
    for fp32, static, tokenizer, metrics, max_length in (
            ("model.onnx", "model.static_int8.onnx", "tokenizer.json", results["export"],
             params.distill.max_length),
            ("teacher.onnx", "teacher.static_int8.onnx", "teacher.tokenizer.json",
             results["export"]["teacher"], params.teacher.max_length)):
        m = metrics["static_int8"]
        graph = onnx.load(str(out / static)).graph
        kinds = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= kinds, static
        assert m["quantized_ops"]["MatMul"] > 0 and m["bytes"] == (out / static).stat().st_size
        assert not set(m["quantized_ops"]) & set(cfg.float_ops)
        assert not _rounded_float_inputs(graph, cfg.float_ops), static
        scales = _weight_scales(graph)
        assert scales and max(scales) > 1, static  # per-channel: one scale per column
        assert m["calibration"] == {"method": cfg.method, "split": "train",
                                    "batches": m["calibration"]["batches"],
                                    "examples": m["calibration"]["examples"]}
        assert 0 < m["calibration"]["examples"] <= (cfg.calibration_batches
                                                    * cfg.calibration_batch_size)
        assert 0.5 <= m["argmax_agreement"] <= 1 and m["max_abs_error"] >= 0
        validation = load_split(params.paths, "validation")["text"].tolist()
        assert m["examples"] == len(validation) and m["texts"].startswith("validation")
        assert not set(validation) & set(load_split(params.paths, "train")["text"])
        from tokenizers import Tokenizer

        enc = TextEncoder(Tokenizer.from_file(str(out / tokenizer)), max_length)
        ref, q = session(out / fp32), session(out / static)
        assert [i.shape for i in q.get_inputs()] == [["batch", "sequence"]] * 2
        agree = []
        for size in (7, 3, 1):  # batch and sequence axes both vary
            for start in range(0, len(texts), 40):
                ids, mask = enc(texts[start : start + size])
                feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                a, b = ref.run(None, feed)[0], q.run(None, feed)[0]
                assert b.shape == a.shape and np.isfinite(b).all()
                agree += (a.argmax(-1) == b.argmax(-1)).tolist()
        assert np.mean(agree) >= 0.9, (static, np.mean(agree))
    # The teacher is post-norm: its residual Adds read the LayerNorm outputs the next MatMuls
    # read quantised; they get the float tensors back.
    assert results["export"]["teacher"]["static_int8"]["float_inputs_unrounded"] > 0


def test_static_int8_options_change_the_graph(tmp_path):
    """per_channel, float_ops and the calibration methods do what they say, on a tiny
    student."""
    import onnx

    from components.config import StaticInt8
    from components.exporting.quantization import quantize_static_int8

    torch.manual_seed(0)
    model = tiny_student()
    src = tmp_path / "m.onnx"
    export_onnx(model, pad_batch([[2, 5, 3]], 0), src, opset=17)
    calibration = _feeds([pad_batch([[2, 5, 6, 7, 3], [2, 9, 3]], 0),
                          pad_batch([[2, 8, 8, 4, 4, 4, 3]] * 3, 0)])
    default = StaticInt8()
    info = quantize_static_int8(src, tmp_path / "d.onnx", calibration, default)
    assert info["calibration"]["batches"] == 2 and info["calibration"]["examples"] == 5
    graph = onnx.load(str(tmp_path / "d.onnx")).graph
    assert max(_weight_scales(graph)) > 1
    assert not set(info["quantized_ops"]) & set(default.float_ops)
    assert not _rounded_float_inputs(graph, default.float_ops)
    # Per tensor: one scale per weight.
    quantize_static_int8(src, tmp_path / "t.onnx", calibration,
                         default.model_copy(update={"per_channel": False}))
    assert set(_weight_scales(onnx.load(str(tmp_path / "t.onnx")).graph)) == {1}
    # Nothing kept float: the normalisations, softmaxes and adds are quantised too.
    every = quantize_static_int8(src, tmp_path / "a.onnx", calibration,
                                 default.model_copy(update={"float_ops": []}))
    assert {"Add", "LayerNormalization", "Softmax"} <= set(every["quantized_ops"])
    assert info["quantized_ops"]["MatMul"] == 2 * 6  # per layer: qkv, 2 attention, out, 2 MLP
    for method in ("entropy", "percentile"):  # batches of different lengths calibrate too
        m = quantize_static_int8(src, tmp_path / f"{method}.onnx", calibration,
                                 default.model_copy(update={"method": method,
                                                            "activation_symmetric": True}))
        assert m["calibration"]["method"] == method and m["activation_symmetric"]
        sess = session(tmp_path / f"{method}.onnx")
        assert np.isfinite(sess.run(None, calibration[1])[0]).all()


def test_static_int8_op_types_are_ones_onnxruntime_quantises():
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from components.config import QUANTIZABLE_OPS

    assert set(QUANTIZABLE_OPS) <= set(QDQRegistry) | set(QLinearOpsRegistry)
    assert {"MatMul", "Gemm", "Gather"} <= set(QUANTIZABLE_OPS)
