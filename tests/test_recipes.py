"""Every config under configs/ (the toy default and the recipes for real models, which can't run
here) parses and passes every check, as `selfdistill train` would see it."""

import pytest

from conftest import ROOT
from trainer.config import dump_config, load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_recipes_are_there():
    names = {path.name for path in CONFIGS}
    assert {"toy.yaml", "opsd-qwen3-1.7b-math.yaml", "sdft-qwen2.5-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert load_config(path, []) == cfg and dump_config(cfg)


def test_published_settings_of_the_recipes():
    opsd = load_config(ROOT / "configs" / "opsd-qwen3-1.7b-math.yaml")
    assert (opsd.learner.lr, opsd.train.prompts_per_step, opsd.rollout.n, opsd.rollout.max_tokens) == (5e-6, 32, 1, 2048)
    assert (opsd.rollout.temperature, opsd.loss.divergence, opsd.teacher.weights) == (1.1, "forward_kl", "initial")
    sdft = load_config(ROOT / "configs" / "sdft-qwen2.5-7b.yaml")
    assert (sdft.teacher.weights, sdft.teacher.ema_alpha, sdft.loss.divergence) == ("ema", 0.01, "forward_kl")
    assert (sdft.loss.mask_first_tokens, sdft.loss.is_cap, sdft.learner.schedule) == (3, 2.0, "cosine")
