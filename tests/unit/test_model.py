"""SASRec, padding, metrics and TorchScript export, on tiny random models."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import BLOCK_STYLES, TrainConfig
from model.evaluate import (
    evaluate_popularity,
    metrics_from_ranks,
    popularity_order,
    ranks_from_scores,
)
from model.sasrec import SASRec, load_encoder, script_encoder
from model.sequences import append_capped, pad_left
from model.train import sequence_loss


def tiny_model(
    seed: int = 0,
    num_items: int = 50,
    max_len: int = 12,
    block: str = "pre-norm",
    distance_bias: bool = False,
) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(num_items, max_len, 16, 2, 2, 0.1, block, distance_bias=distance_bias)
    return with_random_distance_bias(model).eval()


def with_random_distance_bias(model: SASRec) -> SASRec:
    """``model`` with a distance bias far from its zero start, so that it shows."""
    with torch.no_grad():
        model.distance_bias.normal_(0.0, 1.0)
    return model


def random_sequences(n: int, num_items: int, max_len: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(1, num_items + 1, size=rng.integers(1, max_len + 5)).astype(np.int64)
        for _ in range(n)
    ]


def test_pad_left_keeps_newest_items_right_aligned() -> None:
    out = pad_left([[1, 2, 3], [4], [5, 6, 7, 8, 9]], max_len=4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [6, 7, 8, 9]]
    assert pad_left([[1], [2]], max_len=10).shape == (2, 1)
    assert pad_left([[]], max_len=3).tolist() == [[0]]


def test_append_capped_keeps_newest() -> None:
    assert append_capped(["a", "b"], ["c", "d"], 3) == ["b", "c", "d"]
    assert append_capped([], ["a"], 5) == ["a"]


def test_padding_does_not_change_the_user_vector() -> None:
    model = tiny_model()
    seq = torch.tensor([[3, 7, 9, 11]])
    padded = torch.tensor([[0, 0, 0, 0, 3, 7, 9, 11]])
    with torch.no_grad():
        assert torch.allclose(model.encode(seq), model.encode(padded), atol=1e-5)


@pytest.mark.parametrize("block", BLOCK_STYLES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("distance_bias", [False, True])
def test_encode_computes_only_the_newest_position_with_the_same_result(
    heads: int, block: str, distance_bias: bool
) -> None:
    model = SASRec(50, 12, 16, 2, heads, 0.0, block, distance_bias=distance_bias)
    model = with_random_distance_bias(model).eval()
    seqs = torch.from_numpy(pad_left(random_sequences(16, 50, 12), 12))
    with torch.no_grad():
        assert torch.allclose(model.encode(seqs), model(seqs)[:, -1, :], atol=1e-5)


def reference_hidden(model: SASRec, items: list[int]) -> torch.Tensor:
    """Hidden states of one unpadded sequence, written out step by step with an explicit
    causal mask: an independent check of the batched path."""
    x = model.item_emb(torch.tensor(items)) * model.scale + model.pos_emb.weight[: len(items)]
    causal = torch.ones(len(items), len(items), dtype=torch.bool).tril()
    for block in model.blocks:
        attn = block.attn
        normed = block.norm1(x)
        q = attn.qkv(normed).split(model.dim, dim=1)[0]
        # SASRec's block: keys and values from the block's input, not the normed one.
        k, v = attn.qkv(x if block.sasrec else normed).split(model.dim, dim=1)[1:]
        heads = []
        for h in range(attn.heads):
            cols = slice(h * model.dim // attn.heads, (h + 1) * model.dim // attn.heads)
            scores = q[:, cols] @ k[:, cols].T / (model.dim // attn.heads) ** 0.5
            if model.relative:  # block n's bias of head h at query i and key j: [n, h, i - j]
                n = list(model.blocks).index(block)
                for i, j in itertools.product(range(len(items)), repeat=2):
                    scores[i, j] += model.distance_bias[n, h, max(i - j, 0)]
            heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, cols])
        if block.sasrec:  # the normed queries carry the residual, as does the normed input
            x = normed + attn.out(torch.cat(heads, dim=1))
            x = block.norm2(x) + block.ffn(block.norm2(x))
        else:
            x = x + attn.out(torch.cat(heads, dim=1))
            x = x + block.ffn(block.norm2(x))
    return model.final_norm(x)


@pytest.mark.parametrize("block", BLOCK_STYLES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("distance_bias", [False, True])
def test_batched_left_padded_hidden_states_match_a_step_by_step_reference(
    heads: int, block: str, distance_bias: bool
) -> None:
    torch.manual_seed(3)
    model = SASRec(50, 12, 16, 2, heads, 0.0, block, distance_bias=distance_bias)
    model = with_random_distance_bias(model).eval()
    sequences = [s[-12:] for s in random_sequences(12, 50, 12, seed=4)]
    padded = torch.from_numpy(pad_left(sequences, 12))
    with torch.no_grad():
        hidden = model(padded)
        users = model.encode(padded)
        for row, items in enumerate(sequences):
            expected = reference_hidden(model, items.tolist())
            assert torch.allclose(hidden[row, -len(items) :], expected, atol=1e-5)
            assert torch.allclose(users[row], expected[-1], atol=1e-5)


def test_causal_future_items_do_not_leak_into_earlier_positions() -> None:
    model = tiny_model()
    a = torch.tensor([[0, 1, 2, 3, 4]])
    b = torch.tensor([[0, 1, 2, 3, 9]])
    with torch.no_grad():
        ha, hb = model(a), model(b)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-6)
    assert not torch.allclose(ha[:, 4], hb[:, 4])


@pytest.mark.parametrize("block", BLOCK_STYLES)
def test_scripted_encoder_matches_eager(tmp_path: pytest.TempPathFactory, block: str) -> None:
    model = tiny_model(block=block)
    scripted = script_encoder(model)
    path = f"{tmp_path}/encoder.pt"
    scripted.save(path)
    loaded = load_encoder(path)
    seqs = torch.from_numpy(pad_left(random_sequences(32, 50, 12), 12))
    with torch.no_grad():
        eager = model.encode(seqs)
        assert torch.allclose(loaded(seqs), eager, atol=1e-5)
        # Shorter batches (fewer padding columns) are valid input too.
        assert torch.allclose(loaded(seqs[:, -3:]), model.encode(seqs[:, -3:]), atol=1e-5)


def test_a_wider_feed_forward_network_is_saved_and_loaded_with_its_width(
    tmp_path: pytest.TempPathFactory,
) -> None:
    torch.manual_seed(0)
    narrow = SASRec(50, 12, dim=16, blocks=2, heads=1, dropout=0.0).eval()
    torch.manual_seed(0)
    wide = SASRec(50, 12, dim=16, blocks=2, heads=1, dropout=0.0, ffn_mult=4).eval()
    # Each block's two feed-forward layers: 16 x 64 + 64 and 64 x 16 + 16, against
    # 16 x 16 + 16 twice.
    extra = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in narrow.parameters())
    assert extra == 2 * ((16 * 64 + 64 + 64 * 16 + 16) - 2 * (16 * 16 + 16))
    path = f"{tmp_path}/encoder.pt"
    script_encoder(wide).save(path)
    seqs = torch.from_numpy(pad_left(random_sequences(8, 50, 12), 12))
    with torch.no_grad():
        assert torch.allclose(load_encoder(path)(seqs), wide.encode(seqs), atol=1e-5)
        assert not torch.allclose(wide.encode(seqs), narrow.encode(seqs), atol=1e-3)
    # The training settings carry the width to the model.
    configured = SASRec.from_config(50, TrainConfig(dim=16, blocks=1, ffn_mult=3))
    assert [layer.weight.shape for layer in configured.blocks[0].ffn[::3]] == [(48, 16), (16, 48)]


def test_with_a_temperature_scores_are_cosines_in_training_export_and_the_worker_path(
    tmp_path: pytest.TempPathFactory,
) -> None:
    torch.manual_seed(0)
    plain = SASRec(50, 12, dim=16, blocks=2, heads=2, dropout=0.0).eval()
    cosine = SASRec(50, 12, dim=16, blocks=2, heads=2, dropout=0.0, temperature=0.05).eval()
    with torch.no_grad():
        # Item vectors of unequal lengths: an inner product then ranks otherwise.
        plain.item_emb.weight.mul_(torch.linspace(0.2, 5.0, 51).unsqueeze(1))
    cosine.load_state_dict(plain.state_dict())
    seqs = torch.from_numpy(pad_left(random_sequences(16, 50, 12), 12))
    path = f"{tmp_path}/encoder.pt"
    script_encoder(cosine).save(path)
    encoder = load_encoder(path)
    with torch.no_grad():
        users, items = cosine.encode(seqs), cosine.item_embeddings()[1:]
        hidden = plain.encode(seqs)
        # Same weights: the user vector is the plain one's direction, at unit length.
        assert torch.allclose(users, hidden / hidden.norm(dim=1, keepdim=True), atol=1e-5)
        assert torch.allclose(items.norm(dim=1), torch.ones(50), atol=1e-5)
        assert torch.allclose(encoder(seqs), users, atol=1e-5)
        # The worker's incremental path gives the same unit vectors.
        history = [5, 17, 3, 44, 9, 30, 12]
        whole = cosine.encode(torch.from_numpy(pad_left([history], 12)))[0]
        assert torch.allclose(extend_in_steps(encoder, history, [3, 6]), whole, atol=1e-5)
        plain_top = (hidden @ plain.item_embeddings()[1:].T).topk(10).indices
        cosine_top = (users @ items.T).topk(10).indices
        assert not torch.equal(plain_top, cosine_top)
    # Training's softmax reads cosine / temperature.
    batch = torch.from_numpy(pad_left(random_sequences(8, 50, 13, seed=3), 13))
    with torch.no_grad():
        loss = sequence_loss(cosine, batch)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = (targets != 0) & (inputs != 0)
        states = cosine(inputs)[mask]
        logits = F.normalize(states, dim=1) @ items.T / 0.05
        assert torch.allclose(loss, F.cross_entropy(logits, targets[mask] - 1), atol=1e-4)
    configured = SASRec.from_config(50, TrainConfig(dim=16, blocks=1, temperature=0.1))
    assert configured.temperature == 0.1


def test_token_dropout_leaves_out_whole_item_embeddings_in_training_only(
    tmp_path: pytest.TempPathFactory,
) -> None:
    torch.manual_seed(0)
    model = SASRec(50, 12, 8, 1, 1, 0.0, "sasrec", False, 0.3)
    seqs = torch.randint(1, 51, (400, 12))
    positions = torch.arange(12).expand(400, 12)
    model.train()
    items = model.embed(seqs, positions) - model.pos_emb(positions)
    dropped = (items == 0).all(dim=-1)
    assert (items != 0).all(dim=-1).logical_or(dropped).all()  # whole vectors or none
    assert 0.27 < float(dropped.float().mean()) < 0.33
    model.eval()
    assert not (model.embed(seqs, positions) - model.pos_emb(positions) == 0).all(-1).any()
    # The exported encoder is the eval model's.
    path = f"{tmp_path}/encoder.pt"
    script_encoder(model).save(path)
    padded = torch.from_numpy(pad_left(random_sequences(8, 50, 12), 12))
    with torch.no_grad():
        assert torch.allclose(load_encoder(path)(padded), model.encode(padded), atol=1e-5)


def test_no_nan_for_all_padding_rows() -> None:
    model = tiny_model()
    with torch.no_grad():
        out = model(torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_metrics_from_ranks() -> None:
    metrics = metrics_from_ranks(np.array([0, 1, 9, 10, 50]), ks=(1, 10))
    assert metrics["hr@1"] == pytest.approx(1 / 5)
    assert metrics["hr@10"] == pytest.approx(3 / 5)
    expected = (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 5
    assert metrics["ndcg@10"] == pytest.approx(expected)


def test_ranks_filter_seen_items_and_padding() -> None:
    scores = torch.tensor([[9.0, 1.0, 5.0, 4.0, 3.0]])  # padding scored highest on purpose
    # Item 2 (5.0) is seen and removed, so target item 3 (4.0) ranks first.
    ranks = ranks_from_scores(scores, [np.array([2])], torch.tensor([3]))
    assert ranks.tolist() == [0]
    # A target that was itself seen can never be a hit.
    ranks = ranks_from_scores(scores, [np.array([3])], torch.tensor([3]))
    assert ranks.tolist() == [5]


def test_popularity_order_and_baseline() -> None:
    seqs = [np.array([1, 2, 2]), np.array([2, 3]), np.array([3, 3, 4])]
    order = popularity_order(seqs, num_items=5)
    assert order.tolist()[:4] == [2, 3, 1, 4]  # ties broken by lower index
    assert order[-1] == 0  # padding last
    # User 0 has seen 1 and 2, so the most popular unseen item is 3.
    metrics = evaluate_popularity(order, [np.array([1, 2])], np.array([3]))
    assert metrics["hr@1"] == 1.0


def extend_in_steps(
    encoder: torch.nn.Module | torch.jit.ScriptModule, history: list[int], cuts: list[int]
) -> torch.Tensor:
    """The user vector of ``history`` built by ``extend`` over the pieces between
    ``cuts``, each step reusing the keys and values the steps before returned."""
    width = int(encoder.cache_width()) if hasattr(encoder, "cache_width") else 0
    cache = torch.zeros(1, 0, width)
    vector = torch.empty(0)
    for start, stop in zip([0, *cuts], [*cuts, len(history)], strict=True):
        items = torch.tensor([history[start:stop]])
        vector, kv = encoder.extend(items, cache, torch.tensor([start]))
        cache = torch.cat([cache, kv], dim=1)
    return vector[0]


@pytest.mark.parametrize("block", BLOCK_STYLES)
@pytest.mark.parametrize(("blocks", "heads"), [(1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("distance_bias", [False, True])
def test_extend_from_cached_keys_and_values_matches_a_full_encode(
    blocks: int, heads: int, block: str, distance_bias: bool
) -> None:
    torch.manual_seed(5)
    model = SASRec(50, 12, 16, blocks, heads, 0.3, block, distance_bias=distance_bias)
    model = with_random_distance_bias(model).eval()
    scripted = script_encoder(model)
    rng = np.random.default_rng(6)
    for history in (s[-12:].tolist() for s in random_sequences(10, 50, 12, seed=7)):
        cuts = sorted({int(c) for c in rng.integers(1, len(history) + 1, size=3)} - {len(history)})
        with torch.no_grad():
            full = model.encode(torch.tensor([history]))[0]
            assert torch.allclose(extend_in_steps(scripted, history, cuts), full, atol=1e-5)
            # One item at a time, the worker's usual case.
            steps = list(range(1, len(history)))
            assert torch.allclose(extend_in_steps(scripted, history, steps), full, atol=1e-5)


@pytest.mark.parametrize("block", BLOCK_STYLES)
@pytest.mark.parametrize("distance_bias", [False, True])
def test_extend_batches_rows_with_different_cached_and_new_lengths(
    block: str, distance_bias: bool
) -> None:
    model = tiny_model(block=block, distance_bias=distance_bias)
    scripted = script_encoder(model)
    histories = [s[-12:].tolist() for s in random_sequences(8, 50, 12, seed=8)]
    histories = [h for h in histories if len(h) >= 2]
    cached = [len(h) // 2 for h in histories]
    width = int(scripted.cache_width())
    with torch.no_grad():
        caches = []
        for h, n in zip(histories, cached, strict=True):
            _, kv = scripted.extend(
                torch.tensor([h[:n]]), torch.zeros(1, 0, width), torch.tensor([0])
            )
            caches.append(kv[0])
        new = [h[n:] for h, n in zip(histories, cached, strict=True)]
        items = torch.zeros(len(new), max(map(len, new)), dtype=torch.long)
        for row, tail in enumerate(new):
            items[row, : len(tail)] = torch.tensor(tail)
        past = torch.nn.utils.rnn.pad_sequence(caches, batch_first=True)
        vectors, kv = scripted.extend(items, past, torch.tensor(cached))
        expected = model.encode(torch.from_numpy(pad_left(histories, 12)))
    assert torch.allclose(vectors, expected, atol=1e-5)
    assert kv.shape == (len(new), items.size(1), width)


def test_extend_sees_the_cache_it_is_given() -> None:
    """A cache of other items gives another vector: extend really reads it."""
    model = tiny_model()
    width = 2 * 2 * 16
    with torch.no_grad():
        _, kv_a = model.extend(
            torch.tensor([[1, 2, 3]]), torch.zeros(1, 0, width), torch.tensor([0])
        )
        _, kv_b = model.extend(
            torch.tensor([[4, 5, 6]]), torch.zeros(1, 0, width), torch.tensor([0])
        )
        after_a, _ = model.extend(torch.tensor([[7]]), kv_a, torch.tensor([3]))
        after_b, _ = model.extend(torch.tensor([[7]]), kv_b, torch.tensor([3]))
        # Only the first two cached positions are valid: the third must be ignored.
        short, _ = model.extend(torch.tensor([[7]]), kv_a, torch.tensor([2]))
    assert not torch.allclose(after_a, after_b)
    assert torch.allclose(after_a, model.encode(torch.tensor([[1, 2, 3, 7]])), atol=1e-5)
    assert torch.allclose(short, model.encode(torch.tensor([[1, 2, 7]])), atol=1e-5)


def test_an_unknown_block_style_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown block style 'post-norm'"):
        SASRec(50, 12, dim=16, block="post-norm")
