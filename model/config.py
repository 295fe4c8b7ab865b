"""Hyper-parameters of training and indexing, as plain pydantic models.

They are nested inside the application settings (``RECSTREAM_TRAIN__*``,
``RECSTREAM_INDEX__*``) and can also be built directly by tests and scripts.
"""

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, model_validator

from model.errors import ConfigError

BlockStyle = Literal["pre-norm", "sasrec"]
BLOCK_STYLES: tuple[str, ...] = get_args(BlockStyle)
HistoryUse = Literal["newest", "all"]
Loss = Literal["auto", "ce", "sampled-ce"]

# dim auto: the wide model where items have enough events to fit wide vectors.
DENSE_ITEM_EVENTS = 50
WIDE_DIM, NARROW_DIM = 256, 64


class TrainConfig(BaseModel):
    """SASRec architecture and optimisation settings."""

    max_len: int = Field(100, ge=2, le=4096, description="Longest item sequence the model sees.")
    dim: Annotated[int, Field(ge=4, le=4096)] | Literal["auto"] = Field(
        "auto",
        description=f"Embedding and hidden size; auto: {WIDE_DIM} where the log has at least "
        f"{DENSE_ITEM_EVENTS} events per item (enough to fit wide item vectors), "
        f"{NARROW_DIM} below.",
    )
    blocks: int = Field(2, ge=1, le=24, description="Transformer blocks.")
    heads: int = Field(1, ge=1, le=64, description="Attention heads (dividing dim).")
    ffn_mult: int = Field(
        1,
        ge=1,
        le=8,
        description="Each block's feed-forward hidden width as a multiple of dim (1: dim "
        "to dim, as SASRec).",
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="0: an item's score is the inner product of user and item vectors "
        "(SASRec). Above 0: their cosine similarity, divided by this in training's "
        "softmax (HSTU's l2-normalised embeddings); exported vectors are unit length.",
    )
    distance_bias: Literal["off", "on"] = Field(
        "off",
        description="on: each block's attention adds a learnt bias per head and distance "
        "from query to key (T5's and HSTU's relative attention bias), beside the "
        "position embeddings.",
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout in training.")
    token_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="In training, the share of input items whose embedding is left out "
        "(their positions stay).",
    )
    block: BlockStyle = Field(
        "sasrec",
        description="pre-norm, or sasrec: the SASRec paper's block (normed queries carry "
        "the residual, keys and values from the block's input, ReLU).",
    )
    history: HistoryUse = Field(
        "all",
        description="Training rows per user: newest, the newest max_len + 1 items (as "
        "SASRec); all, every item, the older ones in windows of max_len + 1.",
    )
    packing: Literal["off", "on"] = Field(
        "off",
        description="on: training rows shorter than max_len + 1 share a row, each "
        "attending only to itself, so that batches carry less padding; batch_size then "
        "counts packed rows.",
    )
    event_types: Literal["off", "on"] = Field(
        "off",
        description="on: each item's event type (view, click, add_to_cart, purchase) "
        "adds an input embedding, in training and in the worker.",
    )
    loss: Loss = Field(
        "auto",
        description="ce: full softmax cross-entropy; sampled-ce: softmax over negatives "
        "drawn by item frequency, with a logQ correction; auto: ce up to "
        "full_softmax_items items, sampled-ce above.",
    )
    seen: Literal["mask", "keep"] = Field(
        "mask",
        description="mask: each position's softmax leaves out the items already in its "
        "input, as serving and evaluation rank only unseen items; keep: every item.",
    )
    full_softmax_items: int = Field(
        20_000, ge=1, description="Largest catalogue that loss auto trains with ce."
    )
    negatives: int = Field(
        1024, ge=1, description="Negatives per batch (shared by its positions) for sampled-ce."
    )
    epochs: int = Field(30, ge=1, description="Most epochs (early stopping ends sooner).")
    batch_size: int = Field(32, ge=1, description="Training sequences per step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine decays lr to 0 over `epochs` (anneals the last steps)."
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Steps over which lr rises linearly to its value before the schedule "
        "(0: none); without it a deep model can stay stuck at popularity for epochs.",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Validate and keep an exponential moving average of the weights, "
        "updated each step with this decay (0: the weights themselves; 0.999 averages "
        "over about the last 1,000 steps).",
    )
    patience: int = Field(
        10, ge=1, description="Epochs without a better validation NDCG@10 before stopping."
    )
    eval_every: int = Field(1, ge=1, description="Validate every N epochs.")
    valid_users: int = Field(
        10_000,
        ge=0,
        description="Users that each epoch's validation ranks for early stopping (a "
        "fixed random sample; 0: all). The best epoch's figures are over every user.",
    )
    seed: int = Field(42, description="Random seed of initialisation, shuffling and dropout.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")

    def resolved(self, num_items: int, events: int) -> "TrainConfig":
        """This configuration with its ``auto`` settings chosen for a log of ``events``
        events over ``num_items`` items: what training runs and the manifest records."""
        update: dict[str, object] = {}
        if self.loss == "auto":
            update["loss"] = "ce" if num_items <= self.full_softmax_items else "sampled-ce"
        if self.dim == "auto":
            dense = events >= DENSE_ITEM_EVENTS * num_items
            update["dim"] = WIDE_DIM if dense else NARROW_DIM
        try:
            return TrainConfig.model_validate(self.model_dump() | update)
        except ValidationError as exc:
            first = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"training settings for this data: {first}") from None

    def width(self) -> int:
        """``dim`` of a resolved configuration."""
        if self.dim == "auto":
            raise ValueError("dim is auto: resolve the configuration first (resolved())")
        return self.dim

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "TrainConfig":
        if self.dim != "auto" and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class IndexConfig(BaseModel):
    """FAISS index settings; the factory string is kept in the version's manifest."""

    factory: str = Field("Flat", description="FAISS index_factory string, inner-product metric.")
    nprobe: int = Field(16, ge=1, description="IVF lists searched per query.")
    ef_search: int = Field(128, ge=1, description="HNSW candidate list size at query time.")
    device: str = Field("auto", description="auto, cpu or cuda.")
    recall_queries: int = Field(
        1000, ge=1, description="Queries used to measure recall@k against exact at build time."
    )
