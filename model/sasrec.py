"""SASRec: self-attentive sequential recommendation (Kang & McAuley, 2018).

One sequence-to-features path (``forward``) serves training and inference. Sequences
are left-padded with 0, so the newest item is always the last column; item scores are
inner products with the shared item embedding table, which is what the FAISS index
holds. Everything in ``forward`` is tensors and ints so the encoder scripts cleanly.
"""

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import TrainConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, query: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """Causal attention over right-padded ``x`` [B, L, dim] (items first, padding
        after): [B, L, dim]. With ``query`` [B, 1, dim] (one query per row) and
        ``key_mask`` [B, 1, 1, L] (the keys it may see), [B, 1, dim]."""
        batch, length, dim = x.shape
        if query is None:
            q, k, v = self.qkv(x).split(dim, dim=2)
        else:
            q = F.linear(query, self.qkv.weight[:dim], self.qkv.bias[:dim])
            k, v = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).chunk(2, dim=2)
        queries = q.size(1)
        head_dim = dim // self.heads
        q = q.reshape(batch, queries, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        drop = self.dropout if self.training else 0.0
        # Items first, padding after: the causal mask alone keeps every item's query off
        # the padding, so no mask tensor is built and the kernel skips the masked half.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=drop, is_causal=query is None
        )
        out: Tensor = self.out(y.transpose(1, 2).reshape(batch, queries, dim))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: attention then a point-wise feed-forward network."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, keep: Tensor, newest: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """Right-padded [B, L, dim] to [B, L, dim]; with ``newest`` (each row's newest
        position, [B, 1, dim] gather indices) and ``key_mask``, only that position,
        [B, 1, dim], and ``keep`` is that position's."""
        normed = self.norm1(x)
        if newest is None:
            attended = self.attn(normed, None, None)
        else:
            attended = self.attn(normed, normed.gather(1, newest), key_mask)
            x = x.gather(1, newest)
        x = x + self.drop(attended)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x * keep


class SASRec(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int = 64,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.dim = dim
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, dropout) for _ in range(blocks)])
        self.final_norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)
        self._init_weights()

    @classmethod
    def from_config(cls, num_items: int, cfg: TrainConfig) -> "SASRec":
        return cls(num_items, cfg.max_len, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout)

    def _init_weights(self) -> None:
        # N(0, 0.02) weights and zero biases (as GPT-2 and BERT): each residual branch
        # starts small next to the item embeddings instead of swamping them.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: Tensor, last_only: bool = False) -> Tensor:
        """Left-padded item indices [B, L] (L <= max_len; padding only before the items)
        to hidden states [B, L, dim]; with ``last_only``, [B, 1, dim] for the newest
        position, and the last block skips every other query (~40% less work at L = 200)."""
        batch, length = seqs.shape
        lengths = (seqs != 0).sum(dim=1)
        cols = torch.arange(length, device=seqs.device)
        # Rotate each row so its items come first and its padding after: causal
        # attention then needs no padding mask (see CausalSelfAttention).
        shift = (length - lengths).unsqueeze(1)
        seqs = seqs.gather(1, (cols + shift) % length)
        keep = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        # Positions count from the oldest item in the window, whatever the padding: for a
        # history shorter than the window they say how far into it the user is (first
        # items differ: sign-up pages, popular picks).
        x = self.item_emb(seqs) * self.scale + self.pos_emb(cols)
        x = self.emb_drop(x) * keep
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if last_only and i == last:
                at = (lengths - 1).clamp(min=0).view(batch, 1, 1)
                # The newest item sees every item; an empty row sees its first column.
                key_mask = (cols <= at.view(batch, 1)).view(batch, 1, 1, length)
                newest = at.expand(batch, 1, x.size(2))
                x = block(x, keep.gather(1, at), newest, key_mask)
            else:
                x = block(x, keep)
        hidden: Tensor = self.final_norm(x)
        if last_only:
            return hidden
        # Back to the caller's left padding.
        return hidden.gather(1, ((cols - shift) % length).unsqueeze(-1).expand_as(hidden))

    def encode(self, seqs: Tensor) -> Tensor:
        """The user representation: hidden state at the newest position, [B, dim]."""
        return self.forward(seqs, True)[:, -1, :]

    def item_embeddings(self) -> Tensor:
        """Output embedding table [N + 1, dim]; row 0 is padding."""
        return self.item_emb.weight

    def score_all(self, seqs: Tensor) -> Tensor:
        """Scores of every item (padding included) for each sequence, [B, N + 1]."""
        return self.encode(seqs) @ self.item_embeddings().T


class Encoder(nn.Module):
    """What is exported to TorchScript: sequences [B, L] to user vectors [B, dim]."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, seqs: Tensor) -> Tensor:
        return self.model.encode(seqs)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # TorchScript is the artifact contract (a self-contained file, loadable without
    # Python sources); torch marks it deprecated in favour of torch.export, which is
    # not yet a drop-in servable file. Silence only that notice.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", DeprecationWarning)
        yield


def load_encoder(path: str, map_location: str = "cpu") -> torch.jit.ScriptModule:
    with _quiet_jit():
        encoder: torch.jit.ScriptModule = torch.jit.load(path, map_location=map_location)  # type: ignore[no-untyped-call]
    return encoder.eval()


def script_encoder(model: SASRec) -> torch.jit.ScriptModule:
    was_training = model.training
    model.eval()
    try:
        with _quiet_jit():
            scripted: torch.jit.ScriptModule = torch.jit.script(Encoder(model))
    finally:
        model.train(was_training)
    return scripted
