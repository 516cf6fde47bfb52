import pytest

from rollout.pool import shards
from trainer.learner.metrics import merge_rank_metrics


@pytest.mark.parametrize("count, parts", [(10, 3), (3, 5), (64, 2), (0, 2), (7, 1)])
def test_shards_cover_in_order_without_overlap(count, parts):
    pieces = shards(count, parts)
    assert [i for piece in pieces for i in range(count)[piece]] == list(range(count))
    sizes = [piece.stop - piece.start for piece in pieces]
    assert len(pieces) <= parts and (not sizes or max(sizes) - min(sizes) <= 1)


def test_rank_metrics_are_token_weighted():
    merged = merge_rank_metrics([{"tokens": 30.0, "distill/loss": 1.0, "learner/lr": 0.1},
                                 {"tokens": 10.0, "distill/loss": 3.0, "learner/lr": 0.1}])
    assert merged == {"tokens": 40.0, "distill/loss": 1.5, "learner/lr": 0.1}


def test_per_task_metrics_are_weighted_by_their_tasks_tokens():
    from trainer.learner.metrics import task_of, token_means
    assert task_of("distill/math/kl") == "math" and task_of("distill/a/b/loss") == "a/b"
    assert task_of("distill/kl") is None and task_of("distill/topk_mass") is None
    rank_0 = token_means({"tokens": 4.0, "tokens/a": 3.0, "tokens/b": 1.0, "distill/loss": 8.0,
                          "distill/a/loss": 6.0, "distill/b/loss": 2.0})
    assert rank_0 == {"tokens": 4.0, "tokens/a": 3.0, "tokens/b": 1.0, "distill/loss": 2.0,
                      "distill/a/loss": 2.0, "distill/b/loss": 2.0}
    rank_1 = token_means({"tokens": 2.0, "tokens/a": 2.0, "distill/loss": 2.0, "distill/a/loss": 2.0})
    merged = merge_rank_metrics([rank_0, rank_1])
    assert merged == {"tokens": 6.0, "distill/loss": (8.0 + 2.0) / 6, "distill/a/loss": (6.0 + 2.0) / 5,
                      "distill/b/loss": 2.0}


def test_weight_sync_deadline_names_the_late_engine(local_ray):
    import ray

    from core.errors import WeightSyncError
    from rollout.pool import EnginePool
    from rollout.weights import ObjectStoreTransport

    class SlowEngine:  # defined here so Ray ships it by value: workers cannot import test modules
        """Stands in for an engine whose weight load hangs; the sync deadline is what is tested."""

        def __init__(self, delay: float):
            self.delay = delay

        def ready(self):
            return True

        def load_weights(self, weights, version):
            import time
            time.sleep(self.delay)
            return version

    engines = {"student-0": ray.remote(SlowEngine).options(num_cpus=0).remote(0.0),
               "student-1": ray.remote(SlowEngine).options(num_cpus=0).remote(30.0)}
    ray.get([engine.ready.remote() for engine in engines.values()])  # started: only the load is slow
    weights = ray.put({"w": 1})
    with pytest.raises(WeightSyncError, match=r"^weight sync to version 1 timed out after 2s waiting for student-1$"):
        ObjectStoreTransport(timeout_s=2).sync(weights, engines, version=1)
    # the same through the pool, which remembers what it synced for engines that restart
    pool = EnginePool("student", list(engines.values()))
    with pytest.raises(WeightSyncError, match=r"^weight sync to version 3 timed out after 2s waiting for student-1$"):
        pool.sync(ObjectStoreTransport(timeout_s=2), weights, version=3)
    assert pool.weights == {None: (weights, 3)}
    assert ObjectStoreTransport(timeout_s=20).sync(weights, {"student-0": engines["student-0"]}, version=2) < 20
    for engine in engines.values():
        ray.kill(engine)
