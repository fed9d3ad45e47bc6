"""Laying a batch of captions out for the teacher's forward passes: right-packing each row's tokens, and packing several
short captions end to end into rows of `teacher.max_len` tokens (`teacher.packing`), then back to one row per caption."""
from __future__ import annotations

import torch


def pack_right(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's tokens (mask 1) to the front, keeping their order: left- or right-padded input becomes
    right-padded, which the chunk trimming and last-token pooling rely on."""
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def pack_rows(lengths: torch.Tensor, capacity: int) -> list[list[int]]:
    """Caption indices grouped into rows of at most `capacity` tokens, longest captions first, each into the first
    row with room (first-fit decreasing: rows end up nearly full, so little padding is computed)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in torch.argsort(lengths, descending=True, stable=True).tolist():
        n = int(lengths[i])
        r = next((r for r, free in enumerate(room) if free >= n), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= n
    return rows


def row_layout(rows: list[list[int]], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(captions, row, offset): the captions of `rows` in row order, each caption's row and its first token's column
    (the lengths of the captions before it in its row)."""
    sizes = torch.tensor([len(row) for row in rows])
    captions = torch.tensor([c for row in rows for c in row], dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(len(rows)), sizes)
    before = torch.cumsum(lengths[captions], 0) - lengths[captions]  # tokens before each caption, all rows
    return captions, row_of, before - before[torch.cumsum(sizes, 0) - sizes][row_of]
