"""A per-rank ring buffer of the most recent teacher embeddings: what each concept (re)fit clusters."""
from __future__ import annotations

import torch


class EmbeddingBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: torch.Tensor | None = None
        self._next = 0  # slot the next row goes to
        self.size = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()[-self.capacity :]
        if self._data is None:
            self._data = torch.zeros(self.capacity, rows.shape[1])
        idx = (self._next + torch.arange(rows.shape[0])) % self.capacity
        self._data[idx] = rows
        self._next = int((self._next + rows.shape[0]) % self.capacity)
        self.size = min(self.capacity, self.size + rows.shape[0])

    def tensor(self) -> torch.Tensor:
        """The stored rows (order is irrelevant to k-means)."""
        if self._data is None:
            return torch.zeros(0, 0)
        return self._data[: self.size] if self.size < self.capacity else self._data

    def state_dict(self) -> dict:
        return {"data": self._data, "next": self._next, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        self._data, self._next, self.size = state["data"], state["next"], state["size"]
