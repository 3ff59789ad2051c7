"""One forward pass of a Llama-style decoder over the KV cache, rows of different tenants together.

Contract:

* ``Decoder(base)`` drives the base model's own modules (embeddings, per layer: input norm,
  q/k/v/o projections, rotary embedding, post-attention norm, MLP; final norm, ``lm_head``), so
  every decoder linear is whatever the model holds there: the engine wraps them once in
  ``MultiLoraLinear`` and each row gets its own LoRA delta from the batch plan installed by the
  caller (``adapters.runtime.context.use_plan``); outside a plan it is the plain base.
* ``prefill(ids, lengths, kv, row0)``: new sequences, right-padded ``ids [k, T]`` of true
  ``lengths``, written into KV rows ``row0..row0+k-1`` at columns ``0..T-1``; causal attention
  over the prompt itself. Returns each row's next-token logits ``[k, V]`` (at its last real
  token). Padding positions compute garbage that is never attended to (causal) and is
  overwritten by later tokens.
* ``decode(ids, positions, kv)``: one token per active row (``ids [n]``, the token at
  ``positions [n]``, i.e. each row's current length), written into KV rows ``0..n-1`` at its own
  column; each row attends to its columns ``0..position`` only (a boolean mask over the padded
  width). Returns ``[n, V]`` logits.
* Rows never read each other: per-row positions (rotary), per-row masks, per-row LoRA. Numerics
  equal the Hugging Face model's own forward within fp32 rounding (tested against peft and
  ``generate``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from adapters.generation.base import CausalBase
from adapters.generation.kv import KVCache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Decoder:
    def __init__(self, base: CausalBase) -> None:
        model = base.model
        inner = model.model
        self.embed: nn.Module = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm: nn.Module = inner.norm
        self.rotary: nn.Module = inner.rotary_emb
        self.lm_head: nn.Module = model.lm_head
        c = model.config
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.device, self.dtype = base.device, base.dtype

    def new_cache(self, budget_bytes: int) -> KVCache:
        return KVCache(len(self.layers), self.n_kv, self.head_dim, device=self.device, dtype=self.dtype,
                       budget_bytes=budget_bytes)

    def _qkv(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _finish_layer(self, layer: nn.Module, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, lengths: list[int], kv: KVCache, row0: int) -> torch.Tensor:
        k_rows, t = ids.shape
        h = self.embed(ids)
        positions = torch.arange(t, device=self.device).unsqueeze(0).expand(k_rows, t)
        cos, sin = self.rotary(h, positions)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, cos, sin)
            kv.k[i][row0 : row0 + k_rows, :, :t].copy_(k)
            kv.v[i][row0 : row0 + k_rows, :, :t].copy_(v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_heads)
            h = self._finish_layer(layer, h, o)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        return self._logits(h[torch.arange(k_rows, device=self.device), last])

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, kv: KVCache) -> torch.Tensor:
        n = ids.shape[0]
        width = int(positions.max()) + 1
        h = self.embed(ids.view(n, 1))
        cos, sin = self.rotary(h, positions.view(n, 1))
        rows = torch.arange(n, device=self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)).view(n, 1, 1, width)
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, cos, sin)
            kb, vb = kv.k[i], kv.v[i]
            kb[rows, :, positions] = k[:, :, 0]
            vb[rows, :, positions] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, kb[:n, :, :width], vb[:n, :, :width], attn_mask=mask,
                                               scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
            h = self._finish_layer(layer, h, o)
        return self._logits(h[:, 0])
