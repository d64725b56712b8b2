"""TensorRT (`components/exporting/trt/` and the export/evaluate steps that use it): profiles, the
skip/fail paths and the ONNX rewrites run on any CPU, and so do the build and parity code paths
with stand-ins for TensorRT; real engine builds and parity run only on a CUDA GPU with TensorRT
10 (marked `gpu`, skipped elsewhere)."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from components.config import TensorRT, validate
from components.data.files import read_json, write_json
from components.evaluation.systems import tensorrt_runners
from components.exporting.onnx_export import export_onnx
from components.exporting.trt import engines, graphs
from components.exporting.trt.build import calibration_batches, export_engines
from components.stage import StageError
from components.text.tensors import pad_batch
from tests.conftest import tiny_raw_params
from tests.test_distill import tiny_student

AVAILABLE, REASON = engines.availability()
needs_trt = pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT unavailable: {REASON}")
NO_GPU = "no CUDA device (torch.cuda.is_available() is False)"
GPU_CFG = dict(min_batch=1, opt_batch=2, max_batch=4, min_seq=4, opt_seq=8, max_seq=16)


def params_with(tmp_path, **overrides):
    raw = tiny_raw_params(tmp_path, tmp_path / "data.csv", tmp_path / "teacher", **overrides)
    return validate(raw)


@pytest.fixture
def unavailable(monkeypatch):
    """Pretend this machine has no GPU, whatever it has, so the skip paths are deterministic."""
    monkeypatch.setattr(engines, "availability", lambda: (False, NO_GPU))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(tiny_student(), pad_batch([[2, 5, 3]], 0), path, opset=17)
    return path


def random_batches(shapes, seed=0, vocab=50) -> list[dict[str, np.ndarray]]:
    """Padded batches (last row half masked) of the given (batch, seq) shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for b, s in shapes:
        ids = rng.integers(4, vocab, (b, s))
        mask = np.ones((b, s), dtype=np.int64)
        ids[-1, s // 2 :], mask[-1, s // 2 :] = 0, 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# --------------------------------------------------------------------------- profiles


def test_profiles_from_production_params_are_clipped_to_max_length(tmp_path):
    params = params_with(tmp_path)  # tiny: distill.max_length 32, profile seq 8/128/128
    shapes = graphs.profile_shapes(params.export.tensorrt, params.distill.max_length)
    assert set(shapes) == {"input_ids", "attention_mask"}
    assert shapes["input_ids"] == ((1, 8), (8, 32), (32, 32))
    assert shapes["attention_mask"] == shapes["input_ids"]


def test_profiles_respect_a_merging_students_minimum_length():
    cfg = TensorRT(min_seq=8, opt_seq=16, max_seq=64)
    assert [s for _, s in graphs.profile_shapes(cfg, 32, 12)["input_ids"]] == [12, 16, 32]
    with pytest.raises(ValueError, match="at least 40 tokens but distill.max_length is 32"):
        graphs.profile_shapes(cfg, 32, 40)


def test_profiles_keep_values_below_max_length():
    cfg = TensorRT(min_batch=2, opt_batch=4, max_batch=16, min_seq=4, opt_seq=16, max_seq=64)
    assert graphs.profile_shapes(cfg, 128)["input_ids"] == ((2, 4), (4, 16), (16, 64))
    # every length above max_length collapses onto it, including min_seq
    assert graphs.profile_shapes(cfg, 2)["input_ids"] == ((2, 2), (4, 2), (16, 2))


@pytest.mark.parametrize(
    ("fields", "max_length", "message"),
    [
        ({"min_batch": 8, "opt_batch": 4}, 128, r"min_batch <= opt_batch <= max_batch"),
        ({"opt_seq": 256}, 128, r"min_seq <= opt_seq <= max_seq"),
        ({"min_seq": 0}, 128, r"export\.tensorrt\.min_seq must be an integer >= 1"),
        ({"max_batch": "many"}, 128, r"export\.tensorrt\.max_batch .*'many'"),
        ({}, 0, r"distill\.max_length must be an integer >= 1"),
    ],
)
def test_profile_nonsense_is_a_value_error_naming_the_param(fields, max_length, message):
    # model_construct skips pydantic's own checks, as a hand-built config would
    cfg = TensorRT.model_construct(**{**TensorRT().model_dump(), **fields})
    with pytest.raises(ValueError, match=message):
        graphs.profile_shapes(cfg, max_length)


def test_params_reject_an_unordered_profile(tmp_path):
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        params_with(tmp_path, **{"export.tensorrt.min_batch": 64})


# --------------------------------------------------------------------------- skip / fail


def test_availability_gives_a_reason_when_false():
    ok, reason = engines.availability()
    assert isinstance(ok, bool)
    assert (reason == "") if ok else ("CUDA" in reason or "tensorrt" in reason)


def test_auto_skips_with_the_reason(tmp_path, unavailable):
    params = params_with(tmp_path)  # production default: enabled: auto
    assert params.export.tensorrt.enabled == "auto"
    result = export_engines(params, tmp_path / "model.onnx", tmp_path, [])
    assert result == {"status": f"skipped ({NO_GPU})"}
    assert not (tmp_path / graphs.ENGINE_DIR).exists()


def test_disabled_skips_without_looking(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "availability", lambda: pytest.fail("must not be called"))
    params = params_with(tmp_path, **{"export.tensorrt.enabled": False})
    result = export_engines(params, tmp_path / "model.onnx", tmp_path, [])
    assert result == {"status": "skipped (disabled in params)"}


def test_required_but_unavailable_fails_naming_the_fix(tmp_path, unavailable):
    params = params_with(tmp_path, **{"export.tensorrt.enabled": True})
    with pytest.raises(StageError) as err:
        export_engines(params, tmp_path / "model.onnx", tmp_path, [])
    message = str(err.value)
    assert NO_GPU in message
    assert "export.tensorrt.enabled: auto" in message and "still[trt]" in message


def test_the_real_machine_skip_path(tmp_path):
    """No monkeypatching: on this machine auto either skips with the real reason or builds."""
    if AVAILABLE:
        pytest.skip("a GPU with TensorRT is present: the build is covered by the gpu tests")
    result = export_engines(params_with(tmp_path), tmp_path / "m.onnx", tmp_path, [])
    assert result["status"] == f"skipped ({REASON})"


def test_build_and_runner_refuse_clearly_without_tensorrt(tmp_path, tiny_onnx, unavailable):
    cfg = TensorRT(min_batch=1, opt_batch=2, max_batch=4, min_seq=4, opt_seq=8, max_seq=16)
    with pytest.raises(StageError, match="TensorRT is unavailable: no CUDA device"):
        engines.build_engine(tiny_onnx, tmp_path / "fp16.engine", "fp16", cfg, 16)
    with pytest.raises(StageError, match="no CUDA device"):
        engines.TensorRTRunner(tmp_path / "fp16.engine")
    with pytest.raises(ValueError, match="precision must be one of"):
        engines.build_engine(tiny_onnx, tmp_path / "x.engine", "fp8", cfg, 16)
    with pytest.raises(ValueError, match="calibration batches"):
        engines.build_engine(tiny_onnx, tmp_path / "int8.engine", "int8", cfg, 16)


def test_evaluate_reports_why_there_are_no_engines(tmp_path, unavailable):
    params = params_with(tmp_path)
    export = tmp_path / "export"
    systems, reason = tensorrt_runners(params, export)
    assert systems == [] and "metrics.json not found" in reason

    write_json(export / "metrics.json", {"fp32": {}})
    systems, reason = tensorrt_runners(params, export)
    assert systems == [] and "dvc repro -f export" in reason

    write_json(export / "metrics.json", {"tensorrt": {"status": f"skipped ({NO_GPU})"}})
    assert tensorrt_runners(params, export) == ([], f"skipped ({NO_GPU})")

    write_json(export / "metrics.json", {"tensorrt": {"status": "built", "fp16": {}}})
    systems, reason = tensorrt_runners(params, export)
    assert systems == [] and "engines exist but cannot run here" in reason and NO_GPU in reason


# --------------------------------------------------------------------------- ONNX rewrites


def _imports(module) -> tuple[set[str], set[str]]:
    """Modules (and `from` names) `module` imports when it loads, and inside functions."""
    import ast

    tree = ast.parse(Path(module.__file__).read_text())
    eager, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        (eager if node in tree.body else lazy).update(names)
    return eager, lazy


def test_graphs_never_need_tensorrt_and_engines_import_it_lazily():
    eager, lazy = _imports(graphs)
    assert not {n for n in eager | lazy if n.split(".")[0] == "tensorrt"}
    assert "components.exporting.trt.engines" not in eager | lazy
    eager, lazy = _imports(engines)
    assert "tensorrt" not in eager and "tensorrt" in lazy


def test_int32_onnx_keeps_the_logits(tmp_path, tiny_onnx):
    dst = tmp_path / "int32.onnx"
    assert graphs.int32_onnx(tiny_onnx, dst) == ["input_ids", "attention_mask"]
    model = onnx.load(str(dst))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
        "input_ids": TensorProto.INT32, "attention_mask": TensorProto.INT32}
    first = model.graph.node[:2]
    assert [n.op_type for n in first] == ["Cast", "Cast"]
    assert [list(n.input) for n in first] == [["input_ids"], ["attention_mask"]]
    consumers = {x for n in model.graph.node[2:] for x in n.input}
    assert not consumers & {"input_ids", "attention_mask"}  # only the casts read the inputs

    original, rewritten = graphs.reference_session(tiny_onnx), graphs.reference_session(dst)
    assert [i.type for i in rewritten.get_inputs()] == ["tensor(int32)", "tensor(int32)"]
    for feed in random_batches([(3, 16), (1, 5), (7, 9)]):
        expected = original.run(None, feed)[0]
        got = rewritten.run(None, {k: v.astype(np.int32) for k, v in feed.items()})[0]
        np.testing.assert_array_equal(got, expected)


def test_qdq_onnx_is_symmetric_int8_on_weight_matmuls_only(tmp_path, tiny_onnx):
    graph = tmp_path / "int8.onnx"
    calib = random_batches([(4, 16), (3, 9), (8, 12)], seed=1)
    info = graphs.prepare_onnx(tiny_onnx, graph, "int8", calib)
    assert info["quantized_nodes"] == 8  # 2 layers x (qkv, out, mlp in, mlp out)
    assert info["float_head"] == "/head/Gemm" and info["calibration"] == "entropy"

    model = onnx.load(str(graph))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # TensorRT only accepts zero points of 0
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        assert zero_point is None or (zero_point.dtype == np.int8 and not zero_point.any())
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) == 8
    for node in weights:  # per output channel
        w, scale = inits[node.input[0]], inits[node.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[1],)
    produced_by_dq = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Gemm", "Gather"):
            assert not produced_by_dq & set(node.input), f"{node.op_type} must stay float"

    fp32, quant = (graphs.reference_session(tiny_onnx),
                   graphs.reference_session(graph, optimize=False))
    for feed in random_batches([(5, 16), (2, 7)], seed=2):
        a, b = graphs.reference_logits(fp32, feed), graphs.reference_logits(quant, feed)
        assert np.abs(a - b).max() < 0.05 * max(1.0, float(np.abs(a).max()))


def test_calibration_batches_come_from_train_shaped_for_the_profile(tmp_path, monkeypatch):
    """Train texts (the engines' parity is checked on validation batches), read only as far
    as the calibration needs."""
    from components.tokenizer import train
    from tests.conftest import make_examples

    texts = make_examples(per_class=10)["text"].tolist()

    def train_split(paths, split, batch_rows=10_000):
        assert split == "train" and paths == params.paths
        yield texts

    monkeypatch.setattr("components.data.artifacts.iter_split_texts", train_split)
    tok = train(texts, "wordpiece", vocab_size=100, min_frequency=1)
    params = params_with(tmp_path, **{"export.tensorrt.calibration_batches": 3,
                                      "export.tensorrt.opt_batch": 4,
                                      "export.tensorrt.min_seq": 20})
    batches = calibration_batches(params, tok)
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].dtype == np.int32
        assert b["input_ids"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[0] == 4 and 20 <= b["input_ids"].shape[1] <= 32


# --------------------------------------------------------------------------- stand-ins
# The GPU code paths, driven on a CPU: a recording stand-in for the `tensorrt` module (build) and
# an ONNX Runtime stand-in for the engine (runner), so orchestration bugs show up everywhere.


class _Kind(enum.Enum):
    NORMALIZATION = "LayerNormalization"
    SOFTMAX = "Softmax"
    REDUCE = "ReduceMean"
    MATRIX_MULTIPLY = "MatMul"
    OTHER = "*"


class _Layer:
    def __init__(self, node):
        kinds = {k.value: k for k in _Kind}
        self.name, self.type = node.name, kinds.get(node.op_type, _Kind.OTHER)
        self.num_outputs, self.precision, self.output_types = len(node.output), None, {}

    def get_output(self, i):
        return types.SimpleNamespace(dtype="float32")

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


def fake_tensorrt(calls: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.16.1.11"
    trt.float32, trt.float16 = "float32", "float16"
    trt.LayerType = _Kind
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8",
                                            OBEY_PRECISION_CONSTRAINTS="OBEY")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    class Network:
        def __init__(self):
            self.layers = []

        num_layers = property(lambda self: len(self.layers))

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            calls["parsed"] = onnx.load(path)
            self.network.layers = [_Layer(n) for n in calls["parsed"].graph.node]
            calls["layers"] = self.network.layers
            return True

    class Config:
        def __init__(self):
            calls["flags"], calls["profiles"] = set(), []

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].add(flag)

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile.shapes)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["network_flags"] = flags
            return Network()

        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(Profile)

        def build_serialized_network(self, network, config):
            return b"serialized engine"

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    monkeypatch.setattr(engines, "availability", lambda: (True, ""))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    return calls


class OrtEngine:
    """Runs the graph an engine was built from on ONNX Runtime, plus an optional offset."""

    offset = 0.0

    def __init__(self, engine_path):
        engine_path = Path(engine_path)
        assert engine_path.read_bytes() == b"serialized engine"
        self.sess = graphs.reference_session(engine_path.with_suffix(".onnx"), optimize=False)

    def __call__(self, input_ids, attention_mask):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return graphs.reference_logits(self.sess, feed) + self.offset


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_engine_asks_tensorrt_for_the_documented_build(tmp_path, tiny_onnx, fake_gpu,
                                                            precision):
    cfg = TensorRT(**GPU_CFG, workspace_mb=256)
    calib = random_batches([(4, 16), (2, 9)]) if precision == "int8" else None
    engine = tmp_path / "engines" / f"{precision}.engine"
    info = engines.build_engine(tiny_onnx, engine, precision, cfg, 16, calib)

    assert engine.read_bytes() == b"serialized engine" and info["bytes"] == 17
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no temp files
    assert fake_gpu["network_flags"] == 0
    assert fake_gpu["workspace"] == ("WORKSPACE", 256 << 20)
    assert fake_gpu["flags"] == ({"FP16", "OBEY"} | ({"INT8"} if precision == "int8" else set()))
    assert fake_gpu["profiles"] == [{name: ((1, 4), (2, 8), (4, 16))
                                     for name in ("input_ids", "attention_mask")}]
    parsed = fake_gpu["parsed"]
    assert {i.type.tensor_type.elem_type for i in parsed.graph.input} == {TensorProto.INT32}
    has_qdq = any(n.op_type == "QuantizeLinear" for n in parsed.graph.node)
    assert has_qdq == (precision == "int8")
    pinned = [layer for layer in fake_gpu["layers"] if layer.precision == "float32"]
    assert sorted({layer.type.name for layer in pinned}) == ["NORMALIZATION", "SOFTMAX"]
    assert len(pinned) == 6 + 2  # 2 LayerNorms per block, embedding and final norms; 2 softmax
    assert all(layer.output_types == {0: "float32"} for layer in pinned)

    sidecar = read_json(engine.with_name(engine.name + ".json"))
    assert sidecar["precision"] == precision and sidecar["gpu"] == "Fake GPU"
    assert sidecar["tensorrt_version"] == "10.16.1.11" and sidecar["compute_capability"] == "8.9"
    assert sidecar["profiles"]["attention_mask"] == {"min": [1, 4], "opt": [2, 8], "max": [4, 16]}
    assert sidecar["onnx"] == f"{precision}.onnx" and len(sidecar["fp32_layers"]) == 8
    assert "built_at" not in sidecar and "build_seconds" not in sidecar  # no times in outputs


def test_export_engines_checks_parity_and_reports_each_precision(tmp_path, tiny_onnx, fake_gpu,
                                                                monkeypatch):
    monkeypatch.setattr(engines, "TensorRTRunner", OrtEngine)
    params = params_with(tmp_path, **{"distill.max_length": 16,
                                      **{f"export.tensorrt.{k}": v for k, v in GPU_CFG.items()}})
    parity = [pad_batch([[2, 5, 6, 3]] * 3, 0), pad_batch([[2, 9, 3], [2] + [7] * 12 + [3]], 0)]
    result = export_engines(params, tiny_onnx, tmp_path, parity)
    assert result["status"] == "built" and result["gpu"] == "Fake GPU"
    for precision in ("fp16", "int8"):
        entry = result[precision]
        assert entry["status"] == "built" and entry["bytes"] == 17 and entry["batches"] == 2
        assert entry["max_abs_error"] < 1e-4 and 0 <= entry["argmax_agreement_vs_fp32"] <= 1
        assert (tmp_path / "tensorrt" / f"{precision}.engine.json").is_file()
    assert result["int8"]["parity_reference"] == "tensorrt/int8.onnx"
    assert result["int8"]["calibration"] == "parity batches"

    write_json(tmp_path / "metrics.json", {"tensorrt": result})
    runners, reason = tensorrt_runners(params, tmp_path)
    assert reason is None
    assert [name for name, _, _ in runners] == ["student_trt_fp16", "student_trt_int8"]
    ids, mask = parity[0]
    assert runners[0][1](ids, mask).shape == (3, 3)

    monkeypatch.setattr(OrtEngine, "offset", 1.0)
    with pytest.raises(engines.TensorRTParityError, match=r"fp16 engine .* 1\.000e\+00"):
        export_engines(params, tiny_onnx, tmp_path, parity)


# --------------------------------------------------------------------------- GPU



@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_and_matches_onnx_runtime(tmp_path, tiny_onnx, precision):
    cfg = TensorRT(**GPU_CFG, atol=5e-2)
    calib = random_batches([(4, 16), (4, 12), (2, 16)], seed=3) if precision == "int8" else None
    engine = tmp_path / f"{precision}.engine"
    info = engines.build_engine(tiny_onnx, engine, precision, cfg, 16, calib)
    assert engine.is_file() and info["bytes"] > 0 and info["precision"] == precision
    sidecar = read_json(engine.with_name(engine.name + ".json"))
    assert sidecar["profiles"]["input_ids"] == {"min": [1, 4], "opt": [2, 8], "max": [4, 16]}
    assert sidecar["tensorrt_version"].startswith("10.") and sidecar["gpu"]
    assert any(layer.startswith("NORMALIZATION") for layer in sidecar["fp32_layers"])

    runner = engines.TensorRTRunner(engine)
    fp32 = graphs.reference_session(tiny_onnx)
    reference = fp32 if precision == "fp16" else graphs.reference_session(
        engine.with_suffix(".onnx"), optimize=False)
    # batch 7 > max_batch (chunked), seq 3 < min_seq (padded), batch 1 < opt
    feeds = random_batches([(7, 16), (3, 3), (1, 9)], seed=4)
    report = engines.check_engine_parity(runner, reference, fp32, feeds, cfg.atol, precision)
    assert report["max_abs_error"] <= cfg.atol and report["batches"] == 3
    with pytest.raises(ValueError, match="exceeds the engine profile"):
        runner(np.ones((1, 17), np.int64), np.ones((1, 17), np.int64))


@pytest.mark.gpu
@needs_trt
def test_export_engines_builds_every_precision(tmp_path, tiny_onnx):
    params = params_with(tmp_path, **{"distill.max_length": 16, "export.tensorrt.enabled": True,
                                      **{f"export.tensorrt.{k}": v for k, v in GPU_CFG.items()}})
    parity = [pad_batch([[2, 5, 6, 3]] * 3, 0), pad_batch([[2, 9, 3], [2] + [7] * 12 + [3]], 0)]
    result = export_engines(params, tiny_onnx, tmp_path, parity)
    assert result["status"] == "built"
    for precision in ("fp16", "int8"):
        entry = result[precision]
        assert entry["status"] == "built" and entry["bytes"] > 0
        assert entry["max_abs_error"] <= params.export.tensorrt.atol
        assert (tmp_path / "tensorrt" / f"{precision}.engine").is_file()
