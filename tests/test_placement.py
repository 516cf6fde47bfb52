"""Placement groups on a real local Ray: what a bundle asks for, and a group that can't fit fails
with an error that says what did not fit instead of waiting forever. How many threads a CPU actor
takes of its node's cores."""

import os

import pytest
import ray

from conftest import ROOT
from core.errors import SelfDistillError
from trainer.cluster.placement import (
    CPU_ACTOR_SHARE,
    CpuShare,
    actor_resources,
    cpu_sharers,
    cpu_threads,
    group_cpu_share,
    place,
)
from trainer.config import load_config


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


def test_cpu_threads_split_the_cores_among_the_actors_that_compute_at_once():
    assert cpu_threads(None, 16, 4) == 4 and cpu_threads(None, 2, 3) == 1 and cpu_threads(3, 2, 2) == 3
    sync = load_config(ROOT / "configs" / "toy.yaml", ["rollout.engines=2", "learner.num=4"])
    assert cpu_sharers(sync, 4) == 4 and cpu_sharers(sync, 2) == 2  # a sync step's phases take turns
    both = load_config(ROOT / "configs" / "toy.yaml", ["rollout.engines=2", "learner.num=4", "train.async=true",
                                                        "loss.is_cap=2", "teacher.scorer=learner"])
    assert cpu_sharers(both, 4) == 6  # async: the engines sample while the learners train
    teacher_engine = load_config(ROOT / "configs" / "toy.yaml", ["rollout.engines=2", "learner.num=4",
                                                                  "train.async=true", "loss.is_cap=2",
                                                                  "teacher.scorer=engine", "teacher.weights=initial"])
    assert cpu_sharers(teacher_engine, 1) == 7
    # a group is taken over by a run that would start it with the same threads, however they were counted
    two_engines = CpuShare(threads=1, node_cores=2)
    assert two_engines.fits(both, None, 2) and two_engines.fits(sync, None, 2)  # 2 // 6 and 2 // 2 alike
    assert not two_engines.fits(sync, None, 1) and not two_engines.fits(sync, 2, 2)


def test_a_groups_threads_come_from_the_cores_of_its_node(local_ray):
    cfg = load_config(ROOT / "configs" / "toy.yaml", ["learner.num=2"])
    group = place(cfg, 2, gpu=False, name="learners")
    cores = len(os.sched_getaffinity(0))  # the test's Ray runs on this machine
    assert group_cpu_share(cfg, group, None, 2) == CpuShare(max(1, cores // 2), cores)
    assert group_cpu_share(cfg, group, 7, 2) == CpuShare(7, cores)
    ray.util.remove_placement_group(group)


def test_a_models_export_is_served_by_the_same_engines_and_another_architecture_is_not(tmp_path):
    """`trainer.cluster.warm` hands engines to the next run only for a model of the same architecture
    and tokenizer: a `save_pretrained` export of the model (as a stage's checkpoint is) qualifies,
    although it rewrites some fields; another size does not."""
    from transformers import AutoTokenizer

    from toyworld.base import model_config
    from toyworld.tokenizer import build_tokenizer
    from trainer.cluster.warm import model_signature
    tokenizer = build_tokenizer()
    for name, size in (("base", "toy"), ("bigger", "bench")):
        model_config(tokenizer, size).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    # an export: the config and tokenizer as loaded and saved again
    from transformers import AutoConfig
    AutoConfig.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "export")
    AutoTokenizer.from_pretrained(tmp_path / "base").save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer_config.json").read_bytes() != \
        (tmp_path / "base" / "tokenizer_config.json").read_bytes()  # rewritten, as a checkpoint's is
    assert model_signature(str(tmp_path / "export"), None) == model_signature(str(tmp_path / "base"), None)
    assert model_signature(str(tmp_path / "bigger"), None) != model_signature(str(tmp_path / "base"), None)
