"""The seeded, resumable order in which a run draws its training prompts."""

import numpy as np

from core.errors import DataError

# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

class PromptSampler:
    """Seeded epoch-wise shuffle over `num_examples` indices.

    Each epoch is a fresh permutation, so no index repeats or goes missing within an epoch; a
    request that crosses an epoch boundary takes the rest of one epoch and the start of the next.
    `state_dict()` / `load_state_dict()` resume at the exact position.
    """

    def __init__(self, num_examples: int, seed: int):
        if num_examples < 1:
            raise DataError("cannot sample from an empty dataset")
        self.num_examples, self.seed = num_examples, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def next_indices(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.num_examples - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_examples": self.num_examples, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]):
        if state["num_examples"] != self.num_examples:
            raise DataError(f"sampler state is for {state['num_examples']} examples, this dataset has {self.num_examples}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
