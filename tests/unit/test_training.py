"""Training and the offline pipeline on small generated data (no I/O beyond tmp files)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifacts import load_version, read_current
from model.config import IndexConfig, TrainConfig
from model.data import build_sequence_data
from model.errors import ConfigError
from model.pipeline import evaluate_version, train_and_publish
from model.sasrec import ByteDropout, SASRec
from model.train import (
    NegativeSampler,
    lr_scheduler,
    negative_sampler,
    pack_rows,
    seen_before,
    seen_pairs,
    sequence_loss,
    target_mask,
    train_sasrec,
    training_matrix,
)
from stream_worker.produce import generated_log

TINY = TrainConfig(
    max_len=8, dim=16, blocks=1, heads=1, dropout=0.0, epochs=12, batch_size=32, lr=5e-3,
    patience=12, device="cpu",
)  # fmt: skip


def cyclic_sequences(users: int = 120, items: int = 30, length: int = 10) -> dict:
    """Walks over the catalogue: the next item is fully predictable from the last one,
    while popularity is flat."""
    return generated_log(users=users, items=items, length=length)


def test_training_learns_a_sequential_pattern_popularity_cannot() -> None:
    data = build_sequence_data(cyclic_sequences())
    result = train_sasrec(data, TINY, progress=False)
    assert result.test["hr@10"] > 0.9
    assert result.test["hr@10"] > result.popularity_test["hr@10"] + 0.4
    assert result.valid["ndcg@10"] == max(h.valid_ndcg10 or 0.0 for h in result.history)
    assert 1 <= result.best_epoch <= TINY.epochs
    # Throughput in the log: each user's training prefix holds 8 of its 10 items (the last
    # two are held out), 7 of them next-item targets: 840 an epoch.
    for epoch in result.history:
        assert epoch.samples_per_s * epoch.seconds == pytest.approx(120 * 7, rel=0.01)


def test_each_epochs_validation_may_watch_a_sample_and_the_best_is_scored_on_all() -> None:
    data = build_sequence_data(cyclic_sequences(users=120))
    cfg = TINY.model_copy(update={"epochs": 3, "valid_users": 30})
    result = train_sasrec(data, cfg, progress=False)
    for epoch in result.history:
        assert epoch.valid_hr10 is not None
        assert epoch.valid_hr10 * 30 == pytest.approx(round(epoch.valid_hr10 * 30))
    assert result.valid["hr@10"] * 120 == pytest.approx(round(result.valid["hr@10"] * 120))


def test_weight_averaging_validates_and_keeps_the_average_not_the_last_weights() -> None:
    data = build_sequence_data(cyclic_sequences())
    plain = train_sasrec(data, TINY, progress=False)
    assert plain.test["ndcg@10"] > 0.9
    # 48 steps at a decay of 0.9999 leave the average next to the first step's weights:
    # it has not learnt the walk, though the weights it averages have.
    frozen = train_sasrec(data, TINY.model_copy(update={"ema_decay": 0.9999}), progress=False)
    assert frozen.test["ndcg@10"] < 0.6
    assert max(h.valid_ndcg10 or 0.0 for h in frozen.history) < 0.6
    # An average over about the last 100 steps lags the weights early, then learns the
    # walk as well.
    recent = train_sasrec(data, TINY.model_copy(update={"ema_decay": 0.99}), progress=False)
    lagging = zip(recent.history[:2], plain.history[:2], strict=True)
    assert all((r.valid_ndcg10 or 0) < (p.valid_ndcg10 or 0) - 0.3 for r, p in lagging)
    assert recent.test["hr@10"] > 0.9
    assert recent.config.ema_decay == 0.99


def test_a_distance_bias_is_learnt_and_carried_from_the_settings() -> None:
    data = build_sequence_data(cyclic_sequences())
    result = train_sasrec(data, TINY.model_copy(update={"distance_bias": "on"}), progress=False)
    assert result.test["ndcg@10"] > 0.9
    bias = result.model.distance_bias.detach()
    assert bias.shape == (TINY.blocks, TINY.heads, TINY.max_len)
    assert float(bias.abs().max()) > 0.01  # it starts at zero: training moved it
    plain = train_sasrec(data, TINY.model_copy(update={"epochs": 1}), progress=False)
    assert plain.model.distance_bias.numel() == 0


def test_training_is_reproducible_with_a_seed() -> None:
    data = build_sequence_data(cyclic_sequences(users=40))
    cfg = TINY.model_copy(update={"epochs": 2, "dropout": 0.2})
    first = train_sasrec(data, cfg, progress=False)
    second = train_sasrec(data, cfg, progress=False)
    assert [h.loss for h in first.history] == [h.loss for h in second.history]


@pytest.mark.parametrize("length", [2, 5, 6, 11, 13])
def test_all_history_makes_every_transition_a_target_once(length: int) -> None:
    prefix = np.arange(1, length + 1)
    rows = training_matrix([prefix, np.array([7])], max_len=4, history="all")
    transitions = [(int(a), int(b)) for row in rows for a, b in itertools.pairwise(row) if a and b]
    assert sorted(transitions) == [(i, i + 1) for i in range(1, length)]
    newest = training_matrix([prefix], max_len=4)
    assert len(newest) == 1 and (newest[0] == rows[0]).all()  # the newest window first


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warm_up_raises_the_rate_linearly_then_the_schedule_takes_over(schedule: str) -> None:
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule=schedule)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    scheduler = lr_scheduler(optimizer, cfg, total_steps=100)
    assert scheduler is not None
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    decay = [
        0.5 * (1 + np.cos(np.pi * step / 100)) if schedule == "cosine" else 1.0
        for step in range(100)
    ]
    assert rates[0] == pytest.approx(1e-4 * decay[0])
    assert np.diff(rates[:10]).min() > 0  # rising through the warm-up
    for step in range(10, 100):
        assert rates[step] == pytest.approx(1e-3 * decay[step], rel=1e-6)
    no_warm_up = TrainConfig(lr_schedule="constant")
    assert lr_scheduler(optimizer, no_warm_up, total_steps=100) is None


def test_training_on_all_history_learns_from_older_windows() -> None:
    # With max_len 3, "newest" drops most of each 10-item history; "all" trains on it.
    data = build_sequence_data(cyclic_sequences(users=60))
    short = TINY.model_copy(update={"max_len": 3, "epochs": 2, "history": "newest"})
    newest = train_sasrec(data, short, progress=False)
    every = train_sasrec(data, short.model_copy(update={"history": "all"}), progress=False)
    assert every.valid["ndcg@10"] > newest.valid["ndcg@10"] + 0.1


def test_sampled_softmax_also_learns() -> None:
    data = build_sequence_data(cyclic_sequences())
    cfg = TINY.model_copy(update={"loss": "sampled-ce", "negatives": 8})
    assert train_sasrec(data, cfg, progress=False).test["hr@10"] > 0.8


def test_auto_loss_takes_the_full_softmax_up_to_the_threshold() -> None:
    cfg = TrainConfig(full_softmax_items=1000)
    assert cfg.loss == "auto"
    assert cfg.resolved(1000, 5000).loss == "ce"
    assert cfg.resolved(1001, 5000).loss == "sampled-ce"
    assert TrainConfig(loss="ce").resolved(10**6, 5000).loss == "ce"  # a choice stays


def test_auto_dim_is_wide_where_items_have_many_events() -> None:
    cfg = TrainConfig()
    assert cfg.dim == "auto"
    assert cfg.resolved(100, 50 * 100).dim == 256
    assert cfg.resolved(100, 50 * 100 - 1).dim == 64
    assert TrainConfig(dim=32).resolved(100, 10**6).dim == 32
    with pytest.raises(ValueError, match="resolve"):
        cfg.width()
    with pytest.raises(ConfigError, match=r"^training settings for this data: dim \(64\) must"):
        TrainConfig(heads=3).resolved(100, 10)


def test_byte_dropout_drops_at_its_rate_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    drop = ByteDropout(0.2)
    x = torch.ones(400_000)
    y = drop(x)
    dropped = (y == 0).float()
    assert dropped.mean().item() == pytest.approx(51 / 256, abs=0.003)
    # Every byte of a 64-bit draw is uniform: each of the 8 lanes drops alike.
    for lane in range(8):
        assert dropped[lane::8].mean().item() == pytest.approx(51 / 256, abs=0.006)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    assert drop.eval()(x) is x


def test_negative_sampler_draws_by_target_frequency() -> None:
    torch.manual_seed(0)
    counts = np.array([0, 97, 1, 1, 0])  # item 4 is never a target: drawn as 1 in 103
    sampler = NegativeSampler(counts, 20_000, torch.device("cpu"))
    drawn = np.bincount(sampler.draw().numpy(), minlength=5) / 20_000
    assert drawn[0] == 0
    assert drawn[1] == pytest.approx(98 / 103, abs=0.01)
    assert drawn[4] == pytest.approx(1 / 103, abs=0.003)
    assert sampler.log_q[1].item() == pytest.approx(np.log(98 / 103), rel=1e-5)


def test_the_loss_decides_whether_training_draws_negatives() -> None:
    """Only sampled-ce gets a sampler, with the configured negatives, weighted by how
    often each item is a target of the rows (an item with one before it)."""
    rows = np.array([[0, 0, 3, 1, 1], [0, 2, 1, 1, 1]])  # targets: 1, 1, 1, 1, 1
    cpu = torch.device("cpu")
    assert negative_sampler(TINY.model_copy(update={"loss": "ce"}), rows, 4, cpu) is None
    sampled = TINY.model_copy(update={"loss": "sampled-ce", "negatives": 7})
    sampler = negative_sampler(sampled, rows, 4, cpu)
    assert sampler is not None and sampler.negatives == 7
    assert sampler.draw().shape == (7,)
    # counts + 1 of items 1-4 (only item 1 is ever a target): 6, 1, 1, 1
    assert sampler.probs.tolist() == pytest.approx([0, 6 / 9, 1 / 9, 1 / 9, 1 / 9])


def test_logq_correction_makes_the_sampled_gradient_the_full_softmax_one() -> None:
    """Averaged over draws, the sampled softmax's gradient points where the full
    softmax's does when popular negatives are corrected by log q, and elsewhere when
    they are not."""
    torch.manual_seed(0)
    items = 40
    model = SASRec(items, max_len=6, dim=16, blocks=1, dropout=0.0)
    rng = np.random.default_rng(0)
    # Targets skewed to a few popular items, as real logs are.
    rows = rng.zipf(1.6, size=(64, 7)).clip(1, items)
    batch = torch.from_numpy(rows.astype(np.int64))

    def grad(sampler: NegativeSampler | None) -> torch.Tensor:
        model.zero_grad()
        sequence_loss(model, batch, sampler).backward()  # type: ignore[no-untyped-call]
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full = grad(None)
    sampler = NegativeSampler.for_matrix(rows, items, 256, torch.device("cpu"))
    corrected = torch.stack([grad(sampler) for _ in range(30)]).mean(dim=0)
    sampler.log_q = torch.zeros_like(sampler.log_q)  # the same draws, uncorrected
    uncorrected = torch.stack([grad(sampler) for _ in range(30)]).mean(dim=0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(corrected, full, dim=0) > 0.95
    assert cos(uncorrected, full, dim=0) < cos(corrected, full, dim=0) - 0.1


@pytest.mark.parametrize("packed", [False, True])
def test_seen_items_are_found_up_to_each_position(packed: bool) -> None:
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.integers(0, 9, size=(5, 7)))  # repeats, and 0 padding
    candidates = torch.tensor([3, 8, 1, 3])
    mask = torch.from_numpy(rng.random((5, 7)) < 0.7)
    # Packed rows: up to three sequences a row, each position seeing its own only.
    segments = torch.from_numpy(np.sort(rng.integers(1, 4, size=(5, 7)), axis=1))
    segs = segments if packed else None
    seen = seen_before(items, candidates, segs)
    rows, found = seen_pairs(items, mask, segs)
    assert seen.shape == (5, 7, 4)
    selected = [(b, pos) for b, pos in itertools.product(range(5), range(7)) if mask[b, pos]]
    for b, pos in itertools.product(range(5), range(7)):
        own = [i for i in range(pos + 1) if not packed or segments[b, i] == segments[b, pos]]
        had = [int(items[b, i]) for i in own if items[b, i] != 0]
        assert [bool(x) for x in seen[b, pos]] == [int(c) in had for c in candidates]
        if mask[b, pos]:
            number = selected.index((b, pos))
            assert sorted(found[rows == number].tolist()) == sorted(had)
    assert set(rows.tolist()) <= set(range(len(selected)))


@pytest.mark.parametrize("max_len", [4, 9])
def test_packing_keeps_every_transition_in_fewer_rows(max_len: int) -> None:
    rng = np.random.default_rng(0)
    prefixes = [np.arange(1, n + 1) + 100 * u for u, n in enumerate(rng.integers(2, 30, 50))]
    matrix = training_matrix(prefixes, max_len, "all")
    packed, segments = pack_rows(matrix)

    def transitions(rows: np.ndarray, segs: np.ndarray | None = None) -> list[tuple[int, int]]:
        mask = target_mask(rows, segs)
        return sorted(zip(rows[:, :-1][mask].tolist(), rows[:, 1:][mask].tolist(), strict=True))

    assert transitions(packed, segments) == transitions(matrix)
    assert len(packed) < len(matrix)
    assert (packed != 0).mean() > (matrix != 0).mean()
    for row, segs in zip(packed, segments, strict=True):
        assert ((row != 0) == (segs != 0)).all()  # items have a sequence, padding none
        numbers = segs[segs != 0]
        assert numbers[0] == 1 and set(np.diff(numbers)) <= {0, 1}  # 1, 2, ... in order
        # every sequence is one of matrix's rows, whole
        for k in range(1, int(numbers.max()) + 1):
            part = row[segs == k]
            assert any((r[-len(part) :] == part).all() and (r[: -len(part)] == 0).all()
                       for r in matrix)  # fmt: skip
    assert (pack_rows(matrix)[0] == packed).all()  # the same rows every time


@pytest.mark.parametrize("block", ["sasrec", "pre-norm"])
@pytest.mark.parametrize("distance_bias", [False, True])
def test_a_packed_row_encodes_each_sequence_as_a_row_of_its_own(
    block: str, distance_bias: bool
) -> None:
    torch.manual_seed(0)
    model = SASRec(40, 10, 16, 2, 2, 0.0, block, distance_bias=distance_bias).eval()
    with torch.no_grad():
        model.distance_bias.normal_(0.0, 1.0)
    first, second, third = [5, 9, 2], [7, 7, 1, 3], [11, 12]
    row = torch.tensor([[0, *first, *second, *third]])
    segments = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2, 3, 3]])
    packed = model(row, segments=segments)[0]
    at = 1
    for part in (first, second, third):
        alone = model(torch.tensor([part]))[0]
        assert torch.allclose(packed[at : at + len(part)], alone, atol=1e-5)
        at += len(part)

    # In training, with dropout on attention weights too: what one sequence holds changes
    # nothing in another's outputs (the same random draws, as the shapes are the same).
    model = SASRec(40, 10, 16, 2, 2, 0.3, block, distance_bias=distance_bias).train()
    outputs = []
    for middle in (second, [30, 31, 32, 33]):
        torch.manual_seed(1)
        outputs.append(model(torch.tensor([[0, *first, *middle, *third]]), segments=segments)[0])
    assert not torch.allclose(outputs[0][4:8], outputs[1][4:8])
    assert torch.equal(outputs[0][:4], outputs[1][:4])
    assert torch.equal(outputs[0][8:], outputs[1][8:])


def test_packed_rows_give_the_loss_of_the_rows_apart() -> None:
    torch.manual_seed(0)
    items = 12
    model = SASRec(items, max_len=8, dim=8, blocks=1, dropout=0.0).eval()
    # Repeats across the rows: one row's items must not count as seen in another's.
    matrix = training_matrix([np.array([3, 5, 3, 7]), np.array([7, 2, 5]), np.array([1, 9])], 8)
    packed, segments = pack_rows(matrix)
    assert len(packed) == 1
    apart, together = torch.from_numpy(matrix), torch.from_numpy(packed)
    segs = torch.from_numpy(segments)
    for mask_seen in (False, True):
        loss = sequence_loss(model, apart, mask_seen=mask_seen)
        assert sequence_loss(model, together, mask_seen=mask_seen, segments=segs).item() == (
            pytest.approx(loss.item(), rel=1e-6)
        )
    sampler = NegativeSampler(np.array([0, *range(1, items + 1)]), 6, torch.device("cpu"))
    losses = []
    for batch, by in ((apart, None), (together, segs)):
        torch.manual_seed(1)  # the same negatives
        losses.append(sequence_loss(model, batch, sampler, mask_seen=True, segments=by).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_training_on_packed_rows_learns() -> None:
    # Short histories: max_len 8 over users of 4 to 6 items leaves most of a row padding.
    sequences = {
        u: s[: 4 + int(u.split("-")[1]) % 3] for u, s in cyclic_sequences(users=150).items()
    }
    data = build_sequence_data(sequences)
    cfg = TINY.model_copy(update={"packing": "on", "batch_size": 8})
    result = train_sasrec(data, cfg, progress=False)
    assert result.test["hr@10"] > 0.9
    # Each user's prefix of n - 2 items holds n - 3 targets: 1, 2 or 3, 300 an epoch.
    for epoch in result.history:
        assert epoch.samples_per_s * epoch.seconds == pytest.approx(300, rel=0.01)


def _masked_loss_by_hand(
    model: SASRec, batch: torch.Tensor, candidates: torch.Tensor | None, shift: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy at each position over the target and the candidates (every item
    when None) not already in the position's input, logits shifted by ``shift``."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden, emb = model(inputs), model.item_embeddings()
    losses = []
    for b, pos in itertools.product(range(batch.size(0)), range(inputs.size(1))):
        target = int(targets[b, pos])
        if target == 0 or inputs[b, pos] == 0:
            continue
        had = {int(i) for i in inputs[b, : pos + 1]}
        pool = range(1, emb.size(0)) if candidates is None else [int(c) for c in candidates]
        others = [c for c in pool if c not in had and c != target]
        ids = torch.tensor([target, *others])
        logits = hidden[b, pos] @ emb[ids].T - shift[ids]
        losses.append(torch.logsumexp(logits, dim=0) - logits[0])
    return torch.stack(losses).mean()


def test_masking_seen_items_leaves_them_out_of_each_positions_softmax() -> None:
    torch.manual_seed(0)
    items = 12
    model = SASRec(items, max_len=6, dim=8, blocks=1, dropout=0.0).eval()
    # Rows with repeats (a target may itself be in its input: it stays the target).
    batch = torch.tensor([[0, 0, 3, 5, 3, 7, 5], [2, 4, 6, 8, 10, 12, 2], [0, 0, 0, 0, 0, 1, 9]])
    zero = torch.zeros(items + 1)
    full = sequence_loss(model, batch, mask_seen=True)
    by_hand = _masked_loss_by_hand(model, batch, None, zero)
    assert full.item() == pytest.approx(by_hand.item())
    # The mask is applied outside autograd: the gradients are the by-hand loss's still.
    params = list(model.parameters())
    grads = torch.autograd.grad(full, params, allow_unused=True)
    expected = torch.autograd.grad(by_hand, params, allow_unused=True)
    for got, want in zip(grads, expected, strict=True):
        if want is not None:
            assert got is not None and torch.allclose(got, want, atol=1e-6)
    assert full.item() < sequence_loss(model, batch).item()  # fewer rivals, lower loss

    sampler = NegativeSampler(np.array([0, *range(1, items + 1)]), 6, torch.device("cpu"))
    torch.manual_seed(1)
    negatives = sampler.draw()
    torch.manual_seed(1)
    sampled = sequence_loss(model, batch, sampler, mask_seen=True)
    by_hand_sampled = _masked_loss_by_hand(model, batch, negatives, sampler.log_q)
    assert sampled.item() == pytest.approx(by_hand_sampled.item(), rel=1e-5)


def test_training_with_seen_items_kept_in_the_softmax_learns_too() -> None:
    assert TINY.seen == "mask"  # the default, which the other tests train with
    data = build_sequence_data(cyclic_sequences())
    cfg = TINY.model_copy(update={"seen": "keep"})
    assert train_sasrec(data, cfg, progress=False).test["hr@10"] > 0.9


def test_event_types_teach_what_the_items_alone_cannot() -> None:
    """The next item depends on the type of the last event: one step on after a view,
    two after a purchase. Without the types a model can only split its bets."""
    rng = np.random.default_rng(0)
    sequences, types = {}, {}
    for u in range(150):
        item, items, kinds = int(rng.integers(30)), [], []
        for _ in range(10):
            kind = str(rng.choice(["view", "purchase"]))
            items.append(f"i{item}")
            kinds.append(kind)
            item = (item + (1 if kind == "view" else 2)) % 30
        sequences[f"u{u}"], types[f"u{u}"] = items, kinds
    data = build_sequence_data(sequences, event_types=types)
    # 40 epochs: with seen items masked the typed model needs more than 20 here (HR@1
    # 0.77 at 20, 1.0 at 40; 0.97 and 0.99 with them kept).
    update = {"epochs": 40, "patience": 40, "block": "pre-norm", "lr_schedule": "constant"}
    cfg = TINY.model_copy(update=update)
    typed = train_sasrec(data, cfg.model_copy(update={"event_types": "on"}), progress=False)
    plain = train_sasrec(data, cfg, progress=False)
    assert typed.test["hr@1"] > 0.9
    assert plain.test["hr@1"] < 0.7
    assert typed.model.event_types and not plain.model.event_types


def test_event_types_on_without_types_in_the_data_is_a_config_error() -> None:
    data = build_sequence_data(cyclic_sequences(users=20))
    with pytest.raises(ConfigError, match="no event types"):
        train_sasrec(data, TINY.model_copy(update={"event_types": "on"}), progress=False)


def test_early_stopping_stops_before_the_epoch_limit() -> None:
    data = build_sequence_data(cyclic_sequences(users=40))
    cfg = TINY.model_copy(update={"epochs": 200, "patience": 2, "lr": 5e-2})
    result = train_sasrec(data, cfg, progress=False)
    assert len(result.history) < 200
    assert len(result.history) - result.best_epoch <= 2


def test_train_and_publish_then_evaluate_the_published_version(tmp_path: Path) -> None:
    sequences = cyclic_sequences()
    data = build_sequence_data(sequences)
    published = train_and_publish(
        data, {"source": "generated"}, tmp_path, TINY, IndexConfig(), progress=False
    )
    assert read_current(tmp_path) == published.version
    version_dir = tmp_path / published.version
    assert (version_dir / "training_curve.png").stat().st_size > 1000
    loaded = load_version(tmp_path)
    assert loaded.manifest["metrics"]["test"]["hr@10"] == pytest.approx(
        published.result.test["hr@10"]
    )
    assert loaded.manifest["training_data"]["users"] == 120
    assert loaded.manifest["hyperparameters"]["dim"] == 16
    # loss "auto" is recorded as what it chose: 30 items take the full softmax.
    assert loaded.manifest["hyperparameters"]["loss"] == "ce"
    assert len(loaded.manifest["popularity"]) == 30
    # Evaluating the published artifact (TorchScript) agrees with training's own test.
    evaluation = evaluate_version(sequences, loaded)
    assert evaluation.model["hr@10"] == pytest.approx(published.result.test["hr@10"])
    assert evaluation.model["ndcg@10"] == pytest.approx(published.result.test["ndcg@10"], abs=1e-6)
    assert evaluation.popularity["hr@10"] == pytest.approx(
        published.result.popularity_test["hr@10"]
    )
