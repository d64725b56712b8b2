import pytest
import yaml

from components.config import ParamsError, load_params, parse_override, validate
from tests.conftest import ROOT


def production() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_production_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.prepare.source.startswith("pkg:")
    assert params.distill.hidden % params.distill.heads == 0


def test_every_problem_is_reported_at_once_with_its_key():
    raw = production()
    raw["distill"]["heads"] = 3  # 256 % 3 != 0
    raw["teacher"]["epochs"] = "many"
    raw["tokenizer"]["vocab_sise"] = 100  # typo
    raw["tokenizer"]["vocab_size"] = 3  # fewer than the special tokens
    with pytest.raises(ParamsError) as err:
        validate(raw)
    msg = str(err.value)
    assert "teacher.epochs" in msg
    assert "tokenizer.vocab_sise: unknown key" in msg
    assert "tokenizer.vocab_size" in msg
    assert "distill" in msg and "divisible by heads" in msg
    assert "problem(s)" in msg


def test_missing_section_is_named():
    raw = production()
    del raw["prepare"]
    with pytest.raises(ParamsError, match="prepare: required key is missing"):
        validate(raw)


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    params = load_params(path, dict([parse_override("distill.layers=2"),
                                     parse_override("distill.lr=1e-3")]))
    assert params.distill.layers == 2 and params.distill.lr == pytest.approx(1e-3)
    with pytest.raises(ParamsError, match="distill.layrs"):
        load_params(path, {"distill.layrs": 2})
    with pytest.raises(ParamsError, match="key.sub=value"):
        parse_override("distill.layers")


def test_impossible_split_fractions():
    raw = production()
    raw["prepare"]["validation_fraction"] = 0.5
    raw["prepare"]["test_fraction"] = 0.45
    with pytest.raises(ParamsError, match="train split"):
        validate(raw)


def test_cli_validate_reports_problems(tmp_path, capsys):
    from components.cli import dvc_command, main

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    assert main(["validate", "--params", str(path)]) == 0
    assert main(["validate", "--params", str(path), "--set", "distill.heads=3"]) == 2
    assert "divisible by heads" in capsys.readouterr().err
    assert dvc_command([]) == ["dvc", "repro"]
    assert dvc_command(["distill.layers=2"]) == ["dvc", "exp", "run", "-S", "distill.layers=2"]


def test_byte_level_bpe_needs_room_beyond_its_256_bytes():
    with pytest.raises(ParamsError, match=r"byte-level BPE.*more than 261"):
        load_params(ROOT / "params.yaml", {"tokenizer.type": "bpe", "tokenizer.vocab_size": 200})
    ok = load_params(ROOT / "params.yaml", {"tokenizer.type": "wordpiece",
                                             "tokenizer.vocab_size": 200})
    assert ok.tokenizer.vocab_size == 200


def test_every_code_default_is_the_params_yaml_value():
    """params.yaml is the one source of defaults: a pydantic default that disagrees with it
    (as `tokenizer.type` once did: wordpiece in code, bpe in the file) fails here."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from components.config import Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    disagree = []

    def visit(model: type[BaseModel], values: dict, prefix: str) -> None:
        for name, info in model.model_fields.items():
            key, value = f"{prefix}{name}", values.get(name)
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                visit(annotation, value or {}, key + ".")
                continue
            default = info.get_default(call_default_factory=True)
            if default is PydanticUndefined or name not in values:
                continue
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if default != value:
                disagree.append(f"{key}: code {default!r}, params.yaml {value!r}")

    visit(Params, raw, "")
    assert not disagree, "\n".join(disagree)


def test_static_int8_params_are_checked_with_their_key():
    with pytest.raises(ParamsError, match=r"export\.static_int8\.float_ops: \['LayerNorm'\] "
                                          r"not op type"):
        load_params(ROOT / "params.yaml", {"export.static_int8.float_ops": ["LayerNorm"]})
    with pytest.raises(ParamsError, match=r"export\.static_int8\.float_ops: MatMul cannot"):
        load_params(ROOT / "params.yaml", {"export.static_int8.float_ops": ["Add", "MatMul"]})
    with pytest.raises(ParamsError, match=r"export\.static_int8\.method"):
        load_params(ROOT / "params.yaml", {"export.static_int8.method": "kl"})
    with pytest.raises(ParamsError, match=r"export\.static_int8\.calibration_batch_size"):
        load_params(ROOT / "params.yaml", {"export.static_int8.calibration_batch_size": 0})
    off = {"export.static_int8.enabled": False}
    with pytest.raises(ParamsError, match=r"ship\.model: student_onnx_static_int8 needs "
                                          r"export\.static_int8\.enabled: true"):
        load_params(ROOT / "params.yaml", {**off, "ship.model": "student_onnx_static_int8"})
    with pytest.raises(ParamsError, match=r"teacher_onnx_static_int8 needs "
                                          r"export\.static_int8\.enabled: true"):
        load_params(ROOT / "params.yaml", {**off, "evaluate.cascade.teacher":
                                           "teacher_onnx_static_int8"})
    ok = load_params(ROOT / "params.yaml", {"evaluate.cascade.student": "student_onnx_static_int8",
                                            "ship.model": "student_onnx_static_int8"})
    assert ok.export.static_int8.enabled and load_params(ROOT / "params.yaml", off)
