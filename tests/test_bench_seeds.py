"""bench/seeds.py's one line, from curves written out by hand."""

import importlib.util

import pytest

from conftest import ROOT


def _seeds_module():
    spec = importlib.util.spec_from_file_location("seeds", ROOT / "bench" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_and_min_of_the_finals_and_the_worst_dip_below_the_start():
    seeds = _seeds_module()
    curves = [[(0, 0.25), (50, 0.05), (400, 0.90)],   # dips 20 points first
              [(0, 0.25), (50, 0.30), (400, 0.70)],   # never below the start
              [(0, 0.20), (50, 0.12), (400, 0.85)]]
    assert seeds.summarize(curves) == pytest.approx({"median": 0.85, "min": 0.70, "worst_dip": 0.20})
    assert seeds.summarize([[(0, 0.3), (10, 0.4)]])["worst_dip"] == 0.0


def test_a_run_without_evaluation_is_refused():
    seeds = _seeds_module()
    with pytest.raises(SystemExit, match="evaluate nothing"):
        seeds.accuracy_curve([{"step": 0, "reward/mean": 0.1}])
    assert seeds.accuracy_curve([{"step": 0, "eval/addition/accuracy": 0.2, "eval/addition/teacher_accuracy": 1.0},
                                 {"step": 1}, {"step": 2, "eval/addition/accuracy": 0.3}]) == [(0, 0.2), (2, 0.3)]
