"""Placement groups on a real local Ray: what a bundle asks for, and a group that can't fit fails
with an error that says what did not fit instead of waiting forever."""

import pytest
import ray

from trainer.cluster import CPU_ACTOR_SHARE, actor_resources, place
from trainer.config import load_config
from trainer.errors import SelfDistillError

from conftest import ROOT


def test_bundles_reserve_a_gpu_and_a_core_on_gpus_and_a_token_share_on_cpu():
    assert actor_resources(gpu=True) == {"GPU": 1, "CPU": 1}
    assert actor_resources(gpu=False) == {"CPU": CPU_ACTOR_SHARE} and 0 < CPU_ACTOR_SHARE < 0.1


@pytest.mark.parametrize("placement", ["pack", "spread"])
def test_a_group_that_fits_is_placed_and_one_that_does_not_is_a_clear_error(local_ray, placement):
    cfg = load_config(ROOT / "configs" / "toy.yaml", [f"ray.placement={placement}", "ray.placement_timeout_s=2"])
    group = place(cfg, 4, gpu=False, name="learners")
    assert ray.util.placement_group_table(group)["strategy"] == placement.upper()
    ray.util.remove_placement_group(group)
    too_many = int(ray.cluster_resources()["CPU"] / CPU_ACTOR_SHARE) + 1
    with pytest.raises(SelfDistillError, match=rf"learners: no room for {too_many} actors .* after 2 s"):
        place(cfg, too_many, gpu=False, name="learners")
