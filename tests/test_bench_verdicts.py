"""The benchmarks refuse a comparison that means nothing, from curves written out by hand."""

import importlib.util

from conftest import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_continual_has_no_comparison_when_a_method_never_learns_or_sft_forgets_nothing():
    continual = _bench("continual")
    learned = {"sft": [(0, 0.23, 0.27), (10, 0.60, 0.20)], "sd_forward": [(0, 0.23, 0.27), (10, 0.40, 0.26)],
               "sd_reverse": [(0, 0.23, 0.27), (10, 0.45, 0.27)]}
    _, drops = continual.matched_drops(learned, 0.27)
    assert continual.no_comparison(learned, drops) is None
    stuck = {**learned, "sd_reverse": [(0, 0.234, 0.27), (10, 0.234, 0.27)]}  # the fresh clone's reverse KL
    _, drops = continual.matched_drops(stuck, 0.27)
    assert continual.no_comparison(stuck, drops) == "sd_reverse never rose above its start on the new task (23.4%)"
    no_forgetting = {**learned, "sft": [(0, 0.23, 0.27), (10, 0.60, 0.30)]}
    _, drops = continual.matched_drops(no_forgetting, 0.27)
    assert "SFT lost nothing" in continual.no_comparison(no_forgetting, drops)


def test_efficiency_has_no_comparison_when_a_method_never_rises_above_its_start():
    efficiency = _bench("efficiency")
    sd = [(0, 0, 0.245), (10, 700, 0.07), (20, 1400, 0.30)]
    grpo = [(0, 0, 0.245), (10, 2800, 0.265)]
    assert efficiency.no_comparison(sd, grpo) is None
    assert efficiency.no_comparison(sd, [(0, 0, 0.245), (10, 2800, 0.245)]) == "GRPO never rose above its start (0.245) within 10 steps"
    assert efficiency.no_comparison([(0, 0, 0.245), (10, 700, 0.07)], grpo).startswith("self-distillation never rose")
