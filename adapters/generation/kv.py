"""The KV cache of the running batch: one row per active sequence, bounded by a byte budget.

Contract:

* Per layer, ``k[l]`` and ``v[l]`` are ``[rows_cap, kv_heads, width_cap, head_dim]`` buffers.
  Row ``i`` holds sequence ``i`` of the scheduler's active list, its tokens at columns
  ``0..length-1`` (left-aligned: no shifting when sequences join, every row writes its own next
  column); columns past a row's length are masked by the decoder and overwritten in order; they
  always hold finite values (new buffers are zeroed, every write is a real key or value): a
  masked value still enters attention, multiplied by 0.
  Rows ``0..n-1`` are the active ones, so the decoder reads plain views ``[:n]``, never gathers.
* ``ensure(rows, width)`` makes room for that many rows of that many columns, reallocating
  (copying the live rows) only when the buffers are too small; ``move_row`` copies one row over
  another (a retired row's hole is filled by the last row); ``clear`` frees everything when the
  batch empties, so an idle engine holds no KV memory.
* ``budget_bytes`` bounds ``nbytes`` (what the buffers take: ``rows_cap * width_cap *
  bytes_per_token``): ``fits(rows, width)`` is the admission test the scheduler runs before it
  starts a sequence, so a request that does not fit waits or is refused; the cache never grows
  past its budget (``ensure`` raises ``CapacityError`` if asked to).
"""

from __future__ import annotations

import torch

from adapters.errors import CapacityError


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, *, device: torch.device, dtype: torch.dtype,
                 budget_bytes: int) -> None:
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.bytes_per_token = 2 * n_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        if budget_bytes < self.bytes_per_token:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no token ({self.bytes_per_token} bytes each)")
        self.budget_bytes = budget_bytes
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rows_cap = 0
        self.width_cap = 0
        self.reallocations = 0

    @property
    def nbytes(self) -> int:
        return self.rows_cap * self.width_cap * self.bytes_per_token

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    def fits(self, rows: int, width: int) -> bool:
        """Whether ``rows`` rows of ``width`` columns fit the budget."""
        return rows * width * self.bytes_per_token <= self.budget_bytes

    def ensure(self, rows: int, width: int, live: int) -> None:
        """Room for ``rows`` rows of ``width`` columns; rows ``0..live-1`` keep their content."""
        if rows <= self.rows_cap and width <= self.width_cap:
            return
        if not self.fits(rows, width):
            raise CapacityError(f"{rows} KV rows of {width} tokens exceed the {self.budget_bytes} byte budget")
        # grow with headroom (fewer copies), inside the budget
        new_rows, new_width = max(rows, self.rows_cap), max(width, self.width_cap)
        if new_rows > self.rows_cap and self.fits(min(2 * new_rows, new_rows + 16), new_width):
            new_rows = min(2 * new_rows, new_rows + 16)
        if new_width > self.width_cap and self.fits(new_rows, int(new_width * 1.5)):
            new_width = int(new_width * 1.5)
        shape = (new_rows, self.kv_heads, new_width, self.head_dim)
        old_w = self.width_cap
        # zeros, not empty: a masked column still enters attention as weight 0 x value, and 0 x NaN
        # (uninitialised memory) is NaN, so every column a row may mask must hold a finite value
        k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        if live and self.k:
            for layer in range(self.n_layers):
                k[layer][:live, :, :old_w].copy_(self.k[layer][:live])
                v[layer][:live, :, :old_w].copy_(self.v[layer][:live])
        self.k, self.v = k, v
        self.rows_cap, self.width_cap = new_rows, new_width
        self.reallocations += 1

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` columns over row ``dst`` (every layer)."""
        for layer in range(self.n_layers):
            self.k[layer][dst, :, :length].copy_(self.k[layer][src, :, :length])
            self.v[layer][dst, :, :length].copy_(self.v[layer][src, :, :length])

    def clear(self) -> None:
        """Free the buffers (no live rows)."""
        self.k, self.v = [], []
        self.rows_cap = self.width_cap = 0
