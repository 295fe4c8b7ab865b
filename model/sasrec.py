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

from model.config import BLOCK_STYLES, TrainConfig
from model.sequences import TYPE_BITS, TYPE_MASK


class ByteDropout(nn.Module):
    """Dropout whose mask comes from random bytes, 8 to a 64-bit draw.

    ``nn.Dropout`` draws one Bernoulli sample per element, and on CPU that draw was a
    quarter of a MovieLens-1M training step (``recstream bench train`` measures it).
    Here one 64-bit draw masks eight elements: a byte under ``round(p * 256)`` drops
    its element, so the rate is ``p`` rounded to 1/256, and kept elements are scaled by
    ``256 / (256 - round(p * 256))`` so that the expectation is unchanged. Identity in
    evaluation, as ``nn.Dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.cut = round(p * 256)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.cut == 0:
            return x
        return self._drop(x)

    @torch.jit.unused  # training only: the exported encoder never runs it
    def _drop(self, x: Tensor) -> Tensor:
        n = x.numel()
        # randint over the whole int64 range: every byte uniform (random_() leaves the
        # top bit of each draw 0).
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), device=x.device)
        bytes_ = draws.view(torch.uint8)[:n].view(x.shape)
        return x * (bytes_ >= self.cut).to(x.dtype).mul_(256.0 / (256 - self.cut))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.weight_drop = ByteDropout(dropout)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, query: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """Causal attention over right-padded ``x`` [B, L, dim] (items first, padding
        after): [B, L, dim]; with ``key_mask`` [B, 1, L, L] alone, each query sees the
        keys it allows. With ``query`` [B, 1, dim] (one query per row) and ``key_mask``
        [B, 1, 1, L] (the keys it may see), [B, 1, dim]."""
        dim = x.size(2)
        if query is None:
            q, k, v = self.qkv(x).split(dim, dim=2)
        else:
            q = F.linear(query, self.qkv.weight[:dim], self.qkv.bias[:dim])
            k, v = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).chunk(2, dim=2)
        return self.attend(q, k, v, key_mask, query is None and key_mask is None)

    def project(self, queries: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Queries from ``queries`` and keys|values from ``keys`` (the two inputs of a
        SASRec-style block): [B, Q, dim] and [B, K, 2 * dim]."""
        dim = queries.size(2)
        q = F.linear(queries, self.qkv.weight[:dim], self.qkv.bias[:dim])
        return q, F.linear(keys, self.qkv.weight[dim:], self.qkv.bias[dim:])

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Projected queries [B, Q, dim] over keys and values [B, K, dim]: [B, Q, dim]."""
        batch, queries, dim = q.shape
        keys = k.size(1)
        head_dim = dim // self.heads
        q = q.reshape(batch, queries, self.heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, keys, self.heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, keys, self.heads, head_dim).transpose(1, 2)
        if self.training and self.weight_drop.cut > 0:
            y = self._attend_dropping(q, k, v, mask, causal)
        else:
            # Items first, padding after: the causal mask alone keeps every item's query
            # off the padding, so no mask tensor is built and the kernel skips the
            # masked half.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        out: Tensor = self.out(y.transpose(1, 2).reshape(batch, queries, dim))
        return out

    @torch.jit.unused  # training only
    def _attend_dropping(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool
    ) -> Tensor:
        """Attention with dropout on its weights, as SASRec, through ``ByteDropout``
        (the fused kernel draws one Bernoulli sample per weight)."""
        scores = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
        if causal:
            length = scores.size(-1)
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, -torch.inf)
        elif mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.inf)
        elif mask is not None:
            scores = scores + mask  # additive: a bias where allowed, -inf elsewhere
        weights: Tensor = self.weight_drop(scores.softmax(dim=-1))
        return weights @ v


class Block(nn.Module):
    """A transformer block: causal attention then a point-wise feed-forward network.

    ``style`` "pre-norm": each sub-layer reads a layer-normed input and adds to the
    residual stream (GELU). "sasrec", as in the SASRec paper's code: queries come from
    the layer-normed input, keys and values from the block's input, the normed queries
    carry the residual, and the feed-forward network reads and adds to a normed copy
    (ReLU).
    """

    def __init__(
        self, dim: int, heads: int, dropout: float, style: str = "pre-norm", ffn_mult: int = 1
    ) -> None:
        super().__init__()
        if style not in BLOCK_STYLES:
            raise ValueError(f"unknown block style {style!r}; expected one of {BLOCK_STYLES}")
        self.sasrec = style == "sasrec"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        act: nn.Module = nn.ReLU() if self.sasrec else nn.GELU()
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim * ffn_mult),
            act,
            ByteDropout(dropout),
            nn.Linear(dim * ffn_mult, dim),
        )
        self.drop = ByteDropout(dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        normed: Tensor = self.norm2(x)
        residual = normed if self.sasrec else x
        out: Tensor = residual + self.drop(self.ffn(normed))
        return out

    def forward(
        self, x: Tensor, keep: Tensor, newest: Tensor | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        """Right-padded [B, L, dim] to [B, L, dim], causal, or as ``key_mask`` [B, 1, L,
        L] allows; with ``newest`` (each row's newest position, [B, 1, dim] gather
        indices) and ``key_mask`` [B, 1, 1, L], only that position, [B, 1, dim], and
        ``keep`` is that position's."""
        normed = self.norm1(x)
        if self.sasrec:
            queries = normed
            if newest is not None:
                queries = normed.gather(1, newest)
            q, kv = self.attn.project(queries, x)
            k, v = kv.chunk(2, dim=2)
            causal = newest is None and key_mask is None
            x = queries + self.drop(self.attn.attend(q, k, v, key_mask, causal))
        elif newest is None:
            x = x + self.drop(self.attn(normed, None, key_mask))
        else:
            attended = self.attn(normed, normed.gather(1, newest), key_mask)
            x = x.gather(1, newest) + self.drop(attended)
        return self._feed_forward(x) * keep

    def extend(
        self, x: Tensor, keep: Tensor, past: Tensor, mask: Tensor | None, newest: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """New positions [B, M, dim] after cached keys and values ``past`` [B, N,
        2 * dim]: their output and their keys and values [B, M, 2 * dim]. Every new
        position attends as ``mask`` [B, 1, M, N + M] allows (None: plain causal, when N
        is 0); with ``newest`` ([B, 1, dim] gather indices) only each row's newest one
        does, as ``mask`` [B, 1, 1, N + M] allows, and the output is [B, 1, dim]."""
        dim = x.size(2)
        normed = self.norm1(x)
        if self.sasrec:
            q, kv = self.attn.project(normed, x)
            residual = normed
        else:
            qkv = self.attn.qkv(normed)
            q, kv = qkv[:, :, :dim], qkv[:, :, dim:]  # views, no copy
            residual = x
        keys, values = kv[:, :, :dim], kv[:, :, dim:]
        if past.size(1) > 0:
            keys = torch.cat([past[:, :, :dim], keys], dim=1)
            values = torch.cat([past[:, :, dim:], values], dim=1)
        if newest is None:
            attended = self.attn.attend(q, keys, values, mask, mask is None)
        else:
            q, residual = q.gather(1, newest), residual.gather(1, newest)
            attended = self.attn.attend(q, keys, values, mask, False)
            keep = keep.gather(1, newest[:, :, :1])
        x = residual + self.drop(attended)
        return self._feed_forward(x) * keep, kv


def segment_starts(segments: Tensor) -> Tensor:
    """Each position's first column of its run of equal ``segments`` [B, L]: [B, L]."""
    cols = torch.arange(segments.size(1), device=segments.device)
    starts = segments[:, 1:] != segments[:, :-1]
    first = torch.ones_like(starts[:, :1])
    at = torch.where(torch.cat([first, starts], dim=1), cols, torch.zeros_like(cols))
    return at.cummax(dim=1).values


class SASRec(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        dim: int = 64,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.2,
        block: str = "pre-norm",
        event_types: bool = False,
        token_dropout: float = 0.0,
        ffn_mult: int = 1,
        temperature: float = 0.0,
        distance_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        # 0: inner-product scores. Above 0: user and item vectors leave the model unit
        # length (cosine scores), and training divides the scores by it.
        self.temperature = temperature
        self.max_len = max_len
        self.dim = dim
        # With event types, inputs are tokens (model.sequences.pack): each item's type
        # adds its own embedding (row 0, type not known, is zero).
        self.event_types = event_types
        self.type_bits, self.type_mask = TYPE_BITS, TYPE_MASK  # TorchScript reads no globals
        self.type_emb = nn.Embedding((1 << TYPE_BITS) if event_types else 1, dim, padding_idx=0)
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = ByteDropout(dropout)
        # In training, each input item's embedding is left out (its position kept) with
        # this probability: the model learns not to lean on any one earlier item.
        self.token_dropout = token_dropout
        self.blocks = nn.ModuleList(
            [Block(dim, heads, dropout, block, ffn_mult) for _ in range(blocks)]
        )
        # With a distance bias, block i's attention logits add distance_bias[i, head,
        # query position - key position] (zero at the start: plain attention); without,
        # the table is empty and attention takes no mask it does not need.
        self.relative = distance_bias
        self.distance_bias = nn.Parameter(
            torch.zeros(blocks if distance_bias else 0, heads, max_len)
        )
        self.final_norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)
        self._init_weights()

    @classmethod
    def from_config(cls, num_items: int, cfg: TrainConfig) -> "SASRec":
        return cls(
            num_items,
            cfg.max_len,
            cfg.width(),
            cfg.blocks,
            cfg.heads,
            cfg.dropout,
            cfg.block,
            cfg.event_types == "on",
            cfg.token_dropout,
            cfg.ffn_mult,
            cfg.temperature,
            cfg.distance_bias == "on",
        )

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
            self.type_emb.weight[0].zero_()

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Input vectors of item indices (or, with event types, tokens) at ``positions``."""
        if self.event_types:
            items = tokens >> self.type_bits
            x: Tensor = self.item_emb(items) * self.scale + self.type_emb(tokens & self.type_mask)
        else:
            x = self.item_emb(tokens) * self.scale
        if self.training and self.token_dropout > 0:
            x = x * (torch.rand(tokens.shape, device=x.device) >= self.token_dropout).unsqueeze(-1)
        out: Tensor = x + self.pos_emb(positions)
        return out

    def biased(self, block: int, allowed: Tensor, distance: Tensor) -> Tensor:
        """Block ``block``'s additive attention mask [B, heads, Q, K]: its bias at each
        query-to-key ``distance`` [B, Q, K] where ``allowed`` [B, 1, Q, K], -inf
        elsewhere."""
        bias = self.distance_bias[block][:, distance.clamp(0, self.max_len - 1)]
        return bias.transpose(0, 1).masked_fill(~allowed, -torch.inf)

    def targets(self, tokens: Tensor) -> Tensor:
        """Item indices of input tokens (the tokens themselves without event types)."""
        return tokens >> self.type_bits if self.event_types else tokens

    def forward(
        self, seqs: Tensor, last_only: bool = False, segments: Tensor | None = None
    ) -> Tensor:
        """Left-padded item indices (with event types, tokens) [B, L] (L <= max_len;
        padding only before the items) to hidden states [B, L, dim]; with ``last_only``,
        [B, 1, dim] for the newest position, and the last block skips every other query
        (~40% less work at L = 200).

        ``segments`` [B, L] (training's packed rows, :func:`model.train.pack_rows`) says
        which of several sequences in a row each item belongs to (numbered from 1 in
        order; 0 is padding): each sequence is then encoded as if it were a row of its
        own, its positions counted from its first item and its attention kept inside it.
        """
        batch, length = seqs.shape
        lengths = (seqs != 0).sum(dim=1)
        cols = torch.arange(length, device=seqs.device)
        # Rotate each row so its items come first and its padding after: causal
        # attention then needs no padding mask (see CausalSelfAttention).
        shift = (length - lengths).unsqueeze(1)
        rotate = (cols + shift) % length
        seqs = seqs.gather(1, rotate)
        keep = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        # Positions count from the oldest item in the window, whatever the padding: for a
        # history shorter than the window they say how far into it the user is (first
        # items differ: sign-up pages, popular picks).
        positions = cols.unsqueeze(0)
        attend: Tensor | None = None
        if segments is not None:
            segments = segments.gather(1, rotate)
            positions = cols - segment_starts(segments)
            same = segments.unsqueeze(2) == segments.unsqueeze(1)
            attend = (same & (cols.view(1, length, 1) >= cols.view(1, 1, length))).unsqueeze(1)
        x = self.emb_drop(self.embed(seqs, positions)) * keep
        last = len(self.blocks) - 1
        biased: list[Tensor] = []  # each block's additive mask, with a distance bias only
        if self.relative:
            # Items first: a key's distance from a query is their column difference
            # (within a packed sequence too, which is contiguous).
            distance = (cols.view(length, 1) - cols.view(1, length)).unsqueeze(0)
            allowed = attend
            if allowed is None:
                allowed = (cols.view(length, 1) >= cols.view(1, length)).view(1, 1, length, length)
            full = last if last_only else last + 1  # the newest-only block builds its own
            biased = [self.biased(i, allowed, distance) for i in range(full)]
        for i, block in enumerate(self.blocks):
            if last_only and i == last:
                at = (lengths - 1).clamp(min=0).view(batch, 1, 1)
                # The newest item sees every item; an empty row sees its first column.
                key_mask = (cols <= at.view(batch, 1)).view(batch, 1, 1, length)
                if self.relative:
                    key_mask = self.biased(i, key_mask, at - cols.view(1, 1, length))
                newest = at.expand(batch, 1, x.size(2))
                x = block(x, keep.gather(1, at), newest, key_mask)
            elif self.relative:
                x = block(x, keep, None, biased[i])
            else:
                x = block(x, keep, None, attend)
        hidden: Tensor = self.final_norm(x)
        if last_only:
            return hidden
        # Back to the caller's left padding.
        return hidden.gather(1, ((cols - shift) % length).unsqueeze(-1).expand_as(hidden))

    def user_vectors(self, hidden: Tensor) -> Tensor:
        """Hidden states [..., dim] as the vectors scored against ``item_embeddings``:
        themselves, or with a temperature, unit length."""
        if self.temperature > 0:
            return F.normalize(hidden, dim=-1)
        return hidden

    def encode(self, seqs: Tensor) -> Tensor:
        """The user representation: hidden state at the newest position, [B, dim]."""
        return self.user_vectors(self.forward(seqs, True)[:, -1, :])

    def extend(self, items: Tensor, cache: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
        """Incremental encoding, for inference: ``encode`` of whole histories from the
        keys and values of their earlier items.

        ``items`` [B, M] holds each row's new items, oldest first, then 0-padding;
        ``cache`` [B, N, blocks * 2 * dim] the keys and values this method returned for
        the row's earlier items (its first ``cached[b]`` positions; N may be 0, and then
        this is a full encode). Earlier and new items together must fit in ``max_len``.
        Returns the user vectors [B, dim] and the new items' keys and values [B, M,
        blocks * 2 * dim], to append to the row's cache.

        Exact because positions count from the oldest item and attention is causal: a
        new item changes nothing at earlier positions until the window slides.
        """
        batch, new = items.shape
        past = cache.size(1)
        cols = torch.arange(new, device=items.device)
        keep = (items != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        positions = (cached.unsqueeze(1) + cols).clamp(max=self.max_len - 1)
        x = self.emb_drop(self.embed(items, positions)) * keep
        # A new item sees the row's valid cached positions and the new items up to
        # itself; the last block computes only each row's newest item.
        seen_old = torch.arange(past, device=items.device).view(1, past) < cached.view(batch, 1)
        at = ((items != 0).sum(dim=1) - 1).clamp(min=0).view(batch, 1)
        newest_mask = torch.cat([seen_old, cols.view(1, new) <= at], dim=1)
        newest_mask = newest_mask.view(batch, 1, 1, past + new)
        mask: Tensor | None = None
        if past > 0:
            causal = cols.view(1, new, 1) >= cols.view(1, 1, new)
            mask = torch.cat(
                [
                    seen_old.view(batch, 1, past).expand(batch, new, past),
                    causal.expand(batch, new, new),
                ],
                dim=2,
            ).unsqueeze(1)
        newest = at.view(batch, 1, 1).expand(batch, 1, x.size(2))
        width = 2 * self.dim
        last = len(self.blocks) - 1
        biased: list[Tensor] = []  # as in forward(): only with a distance bias
        if self.relative:
            # Positions of the new items' queries and of every key (cached slot k is
            # position k): their differences are the distances forward() sees.
            query_at = cached.view(batch, 1) + cols.view(1, new)
            key_at = torch.cat(
                [torch.arange(past, device=items.device).expand(batch, past), query_at], 1
            )
            distance = query_at.unsqueeze(2) - key_at.unsqueeze(1)
            allowed = mask
            if allowed is None:
                allowed = (cols.view(new, 1) >= cols.view(1, new)).view(1, 1, new, new)
            newest_distance = distance.gather(1, at.view(batch, 1, 1).expand(batch, 1, past + new))
            biased = [self.biased(i, allowed, distance) for i in range(last)]
            biased.append(self.biased(last, newest_mask, newest_distance))
        kvs: list[Tensor] = []
        # ModuleList items are typed as Module, whose attributes mypy cannot see.
        for i, block in enumerate(self.blocks):
            block_past = cache[:, :, i * width : (i + 1) * width]
            if i == last:
                last_mask = biased[i] if self.relative else newest_mask
                x, kv = block.extend(x, keep, block_past, last_mask, newest)  # type: ignore[operator]
            elif self.relative:
                x, kv = block.extend(x, keep, block_past, biased[i], None)  # type: ignore[operator]
            else:
                x, kv = block.extend(x, keep, block_past, mask, None)  # type: ignore[operator]
            kvs.append(kv)
        return self.user_vectors(self.final_norm(x)[:, 0, :]), torch.cat(kvs, dim=2)

    def item_embeddings(self) -> Tensor:
        """Output embedding table [N + 1, dim] (the input table, or with a temperature
        its rows at unit length); row 0 is padding."""
        if self.temperature > 0:
            return F.normalize(self.item_emb.weight, dim=-1)
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

    @torch.jit.export
    def extend(self, items: Tensor, cache: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
        """See ``SASRec.extend``: the worker's incremental path."""
        return self.model.extend(items, cache, cached)

    @torch.jit.export
    def event_types(self) -> bool:
        """Whether inputs are tokens carrying event types (model.sequences.pack); an
        encoder without this method takes plain item indices."""
        return self.model.event_types

    @torch.jit.export
    def cache_width(self) -> int:
        """Floats ``extend`` keeps per cached item: keys and values of every block."""
        return len(self.model.blocks) * 2 * self.model.dim


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


def takes_event_types(encoder: torch.jit.ScriptModule) -> bool:
    """Whether a loaded encoder reads tokens with event types (``model.sequences.pack``);
    encoders exported before event types existed read item indices."""
    return hasattr(encoder, "event_types") and bool(encoder.event_types())


def script_encoder(model: SASRec) -> torch.jit.ScriptModule:
    was_training = model.training
    model.eval()
    try:
        with _quiet_jit():
            scripted: torch.jit.ScriptModule = torch.jit.script(Encoder(model))
    finally:
        model.train(was_training)
    return scripted
