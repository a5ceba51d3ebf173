"""SASRec: a self-attentive sequential recommender, the sequential baseline.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018
(arXiv 1808.09781). A causal Transformer over the user's last ``max_len``
items; the hidden state at position t, dotted with every item embedding
(shared with the input embedding, as in the paper), scores the item at t+1.

Same contract as ``llmrec.baselines``: ``SASRec(catalog, train)`` fits on the
training split in its constructor and ``recommend(history, k)`` ranks the
whole catalog with the history masked. Item ``catalog.index(i) + 1`` is the
model's id of item ``i``; id 0 is padding. Sequences are left-padded, so the
last real item always sits at the last position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmrec.data import Catalog
from llmrec.recommend.baselines import top_k

log = logging.getLogger(__name__)

PAD = 0


@dataclass
class SASRecConfig:
    """Model size and training budget."""

    max_len: int = 50
    """Items of history the model attends to (the paper uses 50 on sparse data, 200 on ML-1M)."""
    hidden: int = 64
    """Embedding and hidden width."""
    blocks: int = 2
    """Self-attention blocks."""
    heads: int = 1
    """Attention heads; ``hidden`` must be a multiple of it."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and block outputs."""
    epochs: int = 50
    """Passes over all users; one pass is one training sequence per user."""
    batch_size: int = 128
    """Users per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    loss: Literal["ce", "bce"] = "ce"
    """``"ce"``: softmax cross-entropy over the whole catalog at every position;
    ``"bce"``: the paper's binary cross-entropy with one sampled negative per position.
    "ce" costs batch x max_len x catalog floats per step but learns more per step."""
    l2_emb: float = 0.0
    """L2 penalty on the item embedding table, added to the loss."""
    seed: int = 0
    """Seeds initialisation, dropout, shuffling and negative sampling."""
    eval_every: int = 5
    """With a validation function, score it every this many epochs and keep the best."""
    patience: int = 4
    """With a validation function, stop after this many evaluations without a better one."""
    device: str = "cpu"
    """Torch device for training and scoring."""

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.hidden < 1 or self.blocks < 1 or self.epochs < 0:
            raise ValueError("max_len, hidden and blocks must be >= 1, epochs >= 0")
        if self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {self.loss!r}")


class _Block(nn.Module):
    """Pre-norm causal self-attention + point-wise feed-forward, each with a residual."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(b, length, 3, self.heads, hidden // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, length, hidden)))
        return x + self.drop(self.ffn(self.norm2(x)))


class _SASRecNet(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.max_len = cfg.max_len
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        self.scale = math.sqrt(cfg.hidden)
        # Small embeddings: N(0, 1) rows would make the initial logits (dot products of
        # two embeddings) of order hidden, and the first steps would only shrink them.
        for emb in (self.item_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, H) of left-padded item ids (B, L), L <= max_len."""
        length = seq.shape[1]
        real = seq != PAD
        # Positions count from the right, so a short unpadded input gets the same
        # positions as its left-padded training form.
        pos = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        x = self.drop(self.item_emb(seq) * self.scale + self.pos_emb(pos))
        x = x * real.unsqueeze(-1)
        # Attend to earlier real items only. The diagonal stays open so a padding query
        # has one key (an all-masked row would give NaN); padding outputs get no loss.
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = (causal & real.unsqueeze(1) | eye).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores (..., n_items) of every real item (padding column dropped)."""
        return hidden @ self.item_emb.weight[1:].T


def _windows(
    train: Mapping[str, Sequence[str]], catalog: Catalog, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs, targets) of each user's last max_len+1 training items.

    targets[t] is the item after inputs[t]; users with fewer than two items teach nothing.
    """
    rows = []
    for user_id in sorted(train):
        ids = [catalog.index(i) + 1 for i in train[user_id]][-(max_len + 1) :]
        if len(ids) >= 2:
            rows.append([PAD] * (max_len + 1 - len(ids)) + ids)
    if not rows:
        raise ValueError("SASRec needs at least one training history with two or more items")
    seqs = torch.tensor(rows, dtype=torch.long)
    return seqs[:, :-1], seqs[:, 1:]


def _sample_negatives(
    window: torch.Tensor, n_items: int, gen: torch.Generator, tries: int = 5
) -> torch.Tensor:
    """One random item per position (B, L) that is not in the user's window (B, L+1)."""
    b, length = window.shape[0], window.shape[1] - 1
    neg = torch.randint(1, n_items + 1, (b, length), generator=gen)
    for _ in range(tries):  # rejection sampling: a collision is rare unless the catalog is tiny
        clash = (neg.unsqueeze(-1) == window.unsqueeze(1)).any(-1)
        if not clash.any():
            break
        neg[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), generator=gen)
    return neg


class SASRec:
    """SASRec fitted on the training split; ranks the whole catalog for a history.

    ``recommend([])`` (no history to attend to) falls back to training popularity. With
    ``validate`` (a function of the model in eval mode returning a score to maximise, e.g.
    validation NDCG@10), training keeps the epoch that scores best (``best_epoch``) and
    stops early; ``valid_curve`` holds (epoch, score) pairs.
    """

    def __init__(
        self,
        catalog: Catalog,
        train: Mapping[str, Sequence[str]],
        cfg: SASRecConfig | None = None,
        validate: Callable[[SASRec], float] | None = None,
    ) -> None:
        self.catalog = catalog
        self.cfg = cfg = cfg or SASRecConfig()
        self.popularity = np.zeros(len(catalog))
        for items in train.values():
            for item_id in set(items):
                self.popularity[catalog.index(item_id)] += 1
        self.best_epoch = cfg.epochs
        self.valid_curve: list[tuple[int, float]] = []
        inputs, targets = _windows(train, catalog, cfg.max_len)
        # fork_rng: seed init and dropout without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.net = _SASRecNet(len(catalog), cfg).to(cfg.device)
            self.losses = self._fit(inputs, targets, validate)
        self.net.eval()

    def _fit(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        validate: Callable[[SASRec], float] | None,
    ) -> list[float]:
        """Next-item training at every position; returns the mean loss of each epoch."""
        cfg, net, n_items = self.cfg, self.net, len(self.catalog)
        gen = torch.Generator().manual_seed(cfg.seed)  # shuffling and negatives
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        losses: list[float] = []
        best, best_state, since_best = -math.inf, None, 0
        net.train()
        bar = tqdm(range(cfg.epochs), desc="sasrec", leave=False)
        for epoch in bar:
            total, batches = 0.0, 0
            for idx in torch.randperm(len(inputs), generator=gen).split(cfg.batch_size):
                inp, tgt = inputs[idx], targets[idx]
                if cfg.loss == "bce":
                    window = torch.cat([inp[:, :1], tgt], dim=1)
                    neg = _sample_negatives(window, n_items, gen)
                inp, tgt = inp.to(cfg.device), tgt.to(cfg.device)
                hidden = net(inp)
                real = inp != PAD  # a real input always has a real target after it
                if cfg.loss == "ce":
                    logits = net.item_scores(hidden[real])
                    loss = F.cross_entropy(logits, tgt[real] - 1)
                else:
                    h = hidden[real]
                    pos_logit = (h * net.item_emb(tgt[real])).sum(-1)
                    neg_logit = (h * net.item_emb(neg.to(cfg.device)[real])).sum(-1)
                    loss = F.binary_cross_entropy_with_logits(
                        pos_logit, torch.ones_like(pos_logit)
                    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
                if cfg.l2_emb:
                    loss = loss + cfg.l2_emb * net.item_emb.weight.pow(2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, batches = total + loss.item(), batches + 1
            losses.append(total / batches)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if validate is not None and (epoch + 1) % cfg.eval_every == 0:
                net.eval()
                score = validate(self)
                net.train()
                self.valid_curve.append((epoch + 1, score))
                if score > best:
                    best, since_best, self.best_epoch = score, 0, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                else:
                    since_best += 1
                    if since_best >= cfg.patience:
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        if losses:
            log.info(
                "sasrec: %d epochs trained, kept epoch %d, final loss %.4f",
                len(losses),
                self.best_epoch,
                losses[-1],
            )
        return losses

    def scores(self, history: Sequence[str]) -> np.ndarray:
        """Score of every catalog item (catalog order) as the next item after ``history``."""
        if not history:
            raise ValueError("SASRec needs at least one history item to score")
        return self.score_matrix([history])[0]

    @torch.inference_mode()
    def score_matrix(self, histories: Sequence[Sequence[str]], batch_size: int = 256) -> np.ndarray:
        """(len(histories), n_items) scores, one batched pass per ``batch_size`` histories;
        an empty history gets the training popularity."""
        out = np.empty((len(histories), len(self.catalog)), dtype=np.float32)
        for start in range(0, len(histories), batch_size):
            chunk = histories[start : start + batch_size]
            rows = [[self.catalog.index(i) + 1 for i in h][-self.cfg.max_len :] for h in chunk]
            width = max(1, *(len(r) for r in rows))
            seq = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.long)
            scores = self.net.item_scores(self.net(seq.to(self.cfg.device))[:, -1])
            out[start : start + len(chunk)] = scores.float().cpu().numpy()
            for row, r in enumerate(rows):
                if not r:
                    out[start + row] = self.popularity
        return out

    def recommend(self, history: Sequence[str], k: int = 10) -> list[str]:
        """The k best unseen items after ``history``; most popular unseen if it is empty."""
        if not history:
            return top_k(self.popularity, self.catalog, history, k)
        return top_k(self.scores(history), self.catalog, history, k)
