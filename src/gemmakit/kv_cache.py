"""The KV cache of the one decoder (model.py): per-row lengths, sliding-window rings, Gemma 4/3n KV sharing, and
the rollback that rejected drafts need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import SLIDING, GemmaConfig

# Every row has its own length, so a server can prefill a new request into a free row while others decode.


@dataclass
class LayerCache:
    k: Tensor  # (B, K, S, H)
    v: Tensor
    slot_pos: Tensor  # (B, S) position held by each slot, -1 if empty
    ring: bool  # sliding layer whose capacity is below the sequence capacity: slots wrap around
    rows: Tensor | None = None  # rows written by the current forward (None = all), set by KVCache.prepare
    starts: Tensor | None = None  # (R,) first column each of those rows writes
    end: int = 0  # max column written + 1 over those rows: how far attention must look
    start: int | None = None  # the common first column when every row is written from the same column

    prefix: int | None = None  # the rows are exactly 0..prefix-1: read them through a view, not a gather

    def _view(self, t: Tensor) -> Tensor:
        if self.prefix is not None:
            return t[: self.prefix]
        return t if self.rows is None else t[self.rows]

    def update(self, k: Tensor, v: Tensor, qpos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys/values (R, K, T, H) and return (keys, values, key positions) attention should see."""
        T, S = k.shape[2], self.k.shape[2]
        if T == 1 and self.rows is None and self.start is not None:  # plain decode step: one slot, every row
            slot = self.start % S if self.ring else self.start
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.slot_pos[:, slot] = qpos[:, 0]
            end = S if self.ring else self.end
            return self.k[:, :, :end], self.v[:, :, :end], self.slot_pos[:, :end]
        rows = self.rows if self.rows is not None else torch.arange(k.shape[0], device=k.device)
        cols = self.starts[:, None] + torch.arange(T, device=k.device)  # (R, T)
        if self.ring and T > 1:
            # Earlier new tokens may need slots that later ones overwrite: attend over old + new, then store. Until
            # the rows wrap, the old keys are their first columns only (a new row's prefill reads none, not S).
            old = min(S, self.end - T)
            keys = torch.cat([self._view(self.k[:, :, :old]), k], dim=2)
            values = torch.cat([self._view(self.v[:, :, :old]), v], dim=2)
            kpos = torch.cat([self._view(self.slot_pos[:, :old]), qpos], dim=1)
            keep = min(T, S)
            self._store(rows, cols[:, -keep:] % S, k[:, :, -keep:], v[:, :, -keep:], qpos[:, -keep:])
            return keys, values, kpos
        self._store(rows, cols % S if self.ring else cols, k, v, qpos)
        end = S if self.ring else self.end
        # cut to the columns in use before gathering rows: a gather copies, and the cache may be far longer
        return (self._view(self.k[:, :, :end]), self._view(self.v[:, :, :end]),
                self._view(self.slot_pos[:, :end]))

    def _store(self, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor, qpos: Tensor) -> None:
        r = rows[:, None]  # (R, 1) against slots (R, T): advanced indexing gives (R, T, K, H)
        self.k[r, :, slots] = k.transpose(1, 2)
        self.v[r, :, slots] = v.transpose(1, 2)
        self.slot_pos[r, slots] = qpos


class KVCache:
    """Per-layer caches for up to `capacity` columns per row, for a batch of B rows.

    Each layer's cache has that layer's KV heads and head dim (Gemma 4 global layers differ). A Gemma 4 KV-shared
    layer stores nothing: `layers[i]` is its source layer's cache object, so the shared keys are held once.
    """

    def __init__(self, cfg: GemmaConfig, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device | str, slack: int = 0) -> None:
        self.capacity = capacity
        self.lengths = [0] * batch  # columns used per row
        self.native = None  # this cache's pointer table for the native decode step, built on first use
        window = (cfg.sliding_window or capacity) + slack
        self.layers: list[LayerCache] = []
        for i, t in enumerate(cfg.layer_types):
            if cfg.kv_source(i) != i:
                self.layers.append(self.layers[cfg.kv_source(i)])
                continue
            size = min(window, capacity) if t == SLIDING else capacity
            shape = (batch, cfg.layer_kv_heads(i), size, cfg.layer_head_dim(i))
            self.layers.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                          torch.zeros(shape, dtype=dtype, device=device),
                                          torch.full((batch, size), -1, dtype=torch.long, device=device),
                                          ring=size < capacity))
        self.stored = list({id(c): c for c in self.layers}.values())  # each cache once, in layer order

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values and slot positions actually allocated."""
        return sum(t.numel() * t.element_size() for c in self.stored for t in (c.k, c.v, c.slot_pos))

    @property
    def length(self) -> int:
        return max(self.lengths)

    def prepare(self, n_new: int, rows: list[int] | None = None) -> None:
        """Point every layer at the columns the next forward of n_new tokens per row will write."""
        idx = rows if rows is not None else list(range(len(self.lengths)))
        starts = [self.lengths[r] for r in idx]
        if max(starts) + n_new > self.capacity:
            raise RuntimeError(f"KV cache full: {max(starts)} + {n_new} > capacity {self.capacity}")
        device = self.layers[0].k.device
        rows_t = None if rows is None else torch.tensor(rows, device=device)
        starts_t = torch.tensor(starts, device=device)
        common = starts[0] if rows is None and len(set(starts)) == 1 else None
        prefix = len(rows) if rows is not None and rows == list(range(len(rows))) else None
        for layer in self.stored:
            layer.rows, layer.starts, layer.end, layer.start = rows_t, starts_t, max(starts) + n_new, common
            layer.prefix = prefix
        self._pending = (idx, n_new)

    def advance(self) -> None:
        idx, n_new = self._pending
        for r in idx:
            self.lengths[r] += n_new

    def rollback(self, row: int, length: int) -> None:
        """Forget a row's columns >= length (rejected speculative tokens); ring slack must cover the span."""
        for layer in self.stored:
            size = layer.slot_pos.shape[1]
            cols = torch.arange(length, self.lengths[row], device=layer.slot_pos.device)
            layer.slot_pos[row, cols % size if layer.ring else cols] = -1
        self.lengths[row] = length

    def move(self, src: int, dst: int) -> None:
        """Move row src's keys into the free row dst (src is free after): the server packs its live rows low, so
        that a decode step spans no free rows. Copies the columns in use only, the ring layers' slots included."""
        if self.lengths[dst]:
            raise RuntimeError(f"KV cache row {dst} is not free")
        n = self.lengths[src]
        for layer in self.stored:
            used = min(n, layer.slot_pos.shape[1])  # a ring's slot = column % size: past its size, every slot
            layer.k[dst, :, :used] = layer.k[src, :, :used]
            layer.v[dst, :, :used] = layer.v[src, :, :used]
            layer.slot_pos[dst, :used] = layer.slot_pos[src, :used]
        self.lengths[dst] = n
        self.reset(src)

    def reset(self, row: int) -> None:
        """Free a row for a new sequence."""
        self.rollback(row, 0)

    def clear(self, row: int) -> None:
        """Empty every slot of a row: after a forward that failed part-way, layers before the failure hold keys
        in columns the row's length does not count (a ring layer would attend to them)."""
        for layer in self.stored:
            layer.slot_pos[row] = -1
        self.lengths[row] = 0
