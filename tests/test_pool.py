import pytest

from rollout.pool import shards
from trainer.cluster import merge_rank_metrics


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
