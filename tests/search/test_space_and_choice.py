"""The search's own parts on real Optuna studies: the space, its refusals, the choice. The
search as it runs (DVC experiments, the Prefect flow, resume, apply) is in test_flows.py."""

from __future__ import annotations

import optuna
import pytest

from components.config import ParamsError, load_params, validate
from components.search import choice, space
from flows.search import SearchError, _storage
from tests.conftest import ROOT, tiny_raw_params


def _problem(base: dict):
    def check(overrides: dict) -> str | None:
        from components.config import apply_overrides

        try:
            validate(apply_overrides(base, overrides))
        except ParamsError as err:
            return str(err)
        return None

    return check


@pytest.fixture
def raw(tmp_path, dataset_csv, tiny_teacher):
    return tiny_raw_params(tmp_path, dataset_csv, tiny_teacher)


def test_points_become_valid_overrides_and_levers_apply_only_where_they_mean_something(raw):
    levers = {"layers": [1, 2], "hidden": [16, 32], "heads": [2], "merge": ["none", "tome"],
              "merge_r": [2], "init": ["scratch"], "max_length": [32]}
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        chosen = space.suggest(trial, levers)
        overrides = space.overrides_for(chosen)
        assert _problem(raw)(overrides) is None, overrides
        assert overrides["distill.intermediate"] == 4 * overrides["distill.hidden"]
        if chosen["merge"] == "none":  # merge_r is not asked without merging
            assert "merge_r" not in trial.params and overrides["distill.merge.r"] == 0
        else:
            assert overrides["distill.merge.r"] == 2
        seen.add(tuple(sorted(trial.params.items())))
        study.tell(trial, [0.5, 1.0])
    assert len(seen) > 3  # the sampler explores the space


def test_teacher_init_ignores_width_and_takes_layer_lists(raw):
    levers = {"init": ["teacher"], "teacher_layers": [[0], [0, 1]], "hidden": [16, 32]}
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    chosen = space.suggest(trial, levers)
    overrides = space.overrides_for(chosen)
    assert "distill.hidden" not in overrides and overrides["distill.init"] == "teacher"
    assert overrides["distill.teacher_layers"] in ([0], [0, 1])
    assert set(trial.params) == {"teacher_layers"}  # init is fixed, width does not apply


def test_an_empty_or_contradictory_space_is_refused_before_any_trial(raw):
    fixed = {"layers": [1], "hidden": [32]}
    assert "nothing to search" in space.space_problems(fixed, _problem(raw))[0]
    bad = {"hidden": [30, 50], "heads": [4]}  # never divisible
    problems = space.space_problems(bad, _problem(raw))
    assert len(problems) == 1 and "contradictory" in problems[0]
    assert "divisible" in problems[0]
    ok = {"hidden": [30, 32], "heads": [4]}
    assert space.space_problems(ok, _problem(raw)) == []


@pytest.mark.parametrize("key,value,message", [
    ("search.max_drop", -0.5, "greater than or equal to 0"),
    ("search.space.depth", [1, 2], "depth"),
    ("search.space.hidden", [64, 64], "listed twice"),
    ("search.sampler", "grid", "nsga2"),
    ("search.storage", "artifacts/student/study.journal", "replaces whole"),
    ("search.study", "../x", "letters, digits"),
])
def test_bad_search_params_are_one_clear_line(raw, key, value, message):
    from components.config import apply_overrides

    with pytest.raises(ParamsError) as err:
        validate(apply_overrides(raw, {key: value}))
    assert message in str(err.value)


def test_an_unreachable_storage_is_one_line(tmp_path):
    with pytest.raises(SearchError) as err:
        _storage("sqlite:////nonexistent-dir/still/study.db", tmp_path)
    assert "cannot open sqlite" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SearchError) as err:
        _storage("postgresql://still:secret@127.0.0.1:9/optuna", tmp_path)
    assert "secret" not in str(err.value)  # the password never reaches a message


def _row(name, acc, gflops, drop):
    return {"experiment": name, "val_accuracy": acc, "gflops": gflops, "drop_pt": drop}


def test_candidates_are_the_front_within_max_drop_cheapest_first():
    rows = [_row("a", 0.90, 1.0, 5.0), _row("b", 0.95, 2.0, 0.0), _row("c", 0.94, 0.5, 1.0),
            _row("d", 0.93, 3.0, 2.0), _row("e", 0.80, 0.1, 15.0)]
    front = {r["experiment"] for r in choice.pareto_front(rows)}
    assert front == {"b", "c", "e"}  # a and d are beaten on both objectives
    chosen, _ = choice.candidates(rows, max_drop=1.5, finalists=4)
    assert [r["experiment"] for r in chosen] == ["c", "b"]
    assert [r["experiment"] for r in choice.candidates(rows, 1.5, 1)[0]] == ["c"]
    none, closest = choice.candidates(rows, max_drop=0.0, finalists=4)
    assert [r["experiment"] for r in none] == ["b"]
    none, closest = choice.candidates([_row("x", 0.8, 1.0, 3.0), _row("y", 0.7, 0.5, 9.0)],
                                     max_drop=1.0, finalists=4)
    assert none == [] and closest["experiment"] == "x"


def test_the_default_space_is_searchable():
    import yaml

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert space.space_problems(params.search.space_dict(), _problem(base)) == []
