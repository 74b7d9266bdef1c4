"""Self-critical sequence training (SCST, Rennie et al. 2017): `fit --scst-after N` trains the epochs after N on
the CIDEr-D of sampled captions instead of the cross-entropy of the references.

Per batch (ruotianluo/self-critical.pytorch's "new_self_critical" by default):
- `sample`: K = 5 captions per image drawn from the decoder's softmax, all K as the G groups of the fused
  decoder (`Decoder.init_state(features, groups=K)`, `Decoder.step`), so they share the image's features and
  their attention projection; <pad> and <start> are never drawn (no caption holds them: the distribution is
  renormalised over the words and <end>), and after <end> the tokens are <pad> and their log-probs masked out.
- `Rewards`: the CIDEr-D of each sample against its image's train captions, with the document frequencies of
  the whole train split (`cider.CiderD`, built once per run), computed on the CPU from the token ids.
- the baseline (`--scst-baseline`): `mean`, the mean reward of the image's other K-1 samples; or `greedy`,
  the reward of the image's greedy caption (the paper's), decoded without dropout and without gradient.
- the loss, ruotianluo's RewardCriterion: -(reward - baseline) x log-prob of each sampled token (<end>
  included), averaged over the sampled tokens of the batch. This is what metrics.jsonl's `train_loss` holds
  for SCST epochs: it is near 0 by construction (the advantages sum to 0 per image with the mean baseline) and
  says little; `reward` (mean sampled reward) and `baseline` (mean baseline) are the numbers to watch.

`SelfCriticalTraining` is the module fit trains in the SCST epochs: under torchrun DDP wraps it, so sampling,
reward and loss all run inside its forward (see loss.CaptionTraining for why). Sampling draws from torch's
global generator, which last.pt saves (and which fit reseeds per (seed, epoch, rank) under torchrun): --resume
continues exactly. Under torchrun each rank averages over its own sampled tokens and DDP averages the ranks: a
mean of the ranks' means, not the exact mean over every token of the global batch that the cross-entropy gets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.cider import CiderD
from pipeline.config import SCST_BASELINES, TrainConfig
from pipeline.console import progress
from pipeline.data import Batch, Batches, CaptionIndex
from pipeline.decode import greedy
from pipeline.distributed import Dist
from pipeline.model import CaptionModel, Decoder
from pipeline.runtime import autocast
from pipeline.vocab import END_ID, PAD_ID, START_ID, Vocabulary, tokenize

SAMPLES = 5  # captions sampled per image (ruotianluo's train_sample_n for new_self_critical)
BASELINES = SCST_BASELINES  # TrainConfig.scst_baseline
COLLAPSE_EPOCHS = 3  # the mean reward falling this many SCST epochs in a row is reported


@dataclass
class Samples:
    """K sampled captions for each of B images."""

    tokens: torch.Tensor  # (B, K, T) int64: words, then <end> (unless cut at T), then <pad>
    log_probs: torch.Tensor  # (B, K, T) float32 log-prob of each sampled token, 0 where masked
    mask: torch.Tensor  # (B, K, T) bool: the sampled tokens, <end> included


def _forbidden(vocab_size: int, device: torch.device) -> torch.Tensor:
    forbid = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    forbid[[PAD_ID, START_ID]] = True
    return forbid


def sample(decoder: Decoder, features: torch.Tensor, k: int = SAMPLES, max_steps: int = 19) -> Samples:
    """Draw `k` captions per image from the decoder's softmax (torch's global generator); features
    (B, 7, 7, D) as the decoder takes them. Log-probs keep their graph when grad is enabled."""
    b, device = features.shape[0], features.device
    state = decoder.init_state(features, groups=k)
    word = torch.full((b, k), START_ID, dtype=torch.long, device=device)
    alive = torch.ones((b, k), dtype=torch.bool, device=device)
    forbid = _forbidden(decoder.cfg.vocab_size, device)
    tokens, log_probs, masks = [], [], []
    for _ in range(max_steps):
        logits, state, _ = decoder.step(state, word)  # (B, K, V)
        logp = logits.float().masked_fill(forbid, -math.inf).log_softmax(-1)
        drawn = torch.multinomial(logp.detach().exp().reshape(b * k, -1), 1).reshape(b, k)
        word = torch.where(alive, drawn, torch.full_like(drawn, PAD_ID))
        picked = logp.gather(-1, drawn.unsqueeze(-1)).squeeze(-1)  # (B, K)
        tokens.append(word)
        log_probs.append(torch.where(alive, picked, torch.zeros_like(picked)))
        masks.append(alive)
        alive = alive & (word != END_ID)
        if not bool(alive.any()):
            break
    return Samples(torch.stack(tokens, -1), torch.stack(log_probs, -1), torch.stack(masks, -1))


class Rewards:
    """CIDEr-D rewards of token ids against store captions, with the train split's document frequencies.

    References are the store's captions tokenised as the vocabulary tokenises (`vocab.tokenize`), whole (not cut
    at max_len, not mapped to <unk>): a sampled <unk> is a word that matches no reference."""

    def __init__(self, vocab: Vocabulary, captions: CaptionIndex, train_rows: np.ndarray) -> None:
        self.captions = captions
        self._refs: dict[int, list[str]] = {}
        self.scorer = CiderD.from_references(self.references(train_rows), words=vocab.to_list())

    def references(self, rows: Sequence[int] | np.ndarray) -> list[list[str]]:
        """Each row's tokenised captions (cached: a run scores the same images every epoch)."""
        out = []
        for row in (int(r) for r in rows):
            if row not in self._refs:
                self._refs[row] = [" ".join(tokenize(t)) for t in self.captions.references([row])[0]]
            out.append(self._refs[row])
        return out

    def __call__(self, rows: np.ndarray, tokens: np.ndarray | Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
        """(B, K) CIDEr-D of token ids (B, K, T) (or B lists of K id lists) for the images `rows`."""
        return self.scorer.score_samples(tokens, self.references(rows), end_id=END_ID, ignore_ids=(PAD_ID, START_ID))


def mean_baseline(rewards: np.ndarray) -> np.ndarray:
    """(B, K) each sample's baseline: the mean reward of the image's other K-1 samples."""
    k = rewards.shape[1]
    return (rewards.sum(1, keepdims=True) - rewards) / (k - 1)


def reward_loss(samples: Samples, advantage: torch.Tensor) -> torch.Tensor:
    """-(reward - baseline) x log-prob, averaged over the sampled tokens; advantage (B, K)."""
    weighted = samples.log_probs * advantage.unsqueeze(-1).to(samples.log_probs)
    return -weighted.sum() / samples.mask.sum().clamp(min=1)


class SelfCriticalTraining(nn.Module):
    """What fit trains in the SCST epochs: `forward(features, rows)` -> (loss, mean reward, mean baseline), the
    stored features of images `rows` encoded by the CaptionModel (its layer4 first on a layer3 store)."""

    def __init__(
        self, model: CaptionModel, rewards: Rewards, baseline: str = "mean", k: int = SAMPLES, max_steps: int = 19
    ) -> None:
        super().__init__()
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}")
        self.model = model
        self.rewards = rewards
        self.baseline = baseline
        self.k = k
        self.max_steps = max_steps

    def forward(self, stored: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample K captions per image, score them, and return (loss, mean reward, mean baseline); rewards are
        computed on the CPU from the detached token ids."""
        decoder = self.model.decoder
        features = self.model.encode(stored)  # (B, 7, 7, D)
        drawn = sample(decoder, features, self.k, self.max_steps)
        reward = self.rewards(rows, drawn.tokens.cpu().numpy())  # (B, K), on the CPU
        if self.baseline == "mean":
            base = mean_baseline(reward)
        else:
            was_training = decoder.training
            decoder.eval()  # the paper's test-time greedy caption: no dropout
            best = greedy(decoder, features.detach(), self.max_steps)
            decoder.train(was_training)
            base = np.broadcast_to(self.rewards(rows, [[d.tokens] for d in best]), reward.shape)
        advantage = torch.from_numpy(reward - base).to(features.device)
        loss = reward_loss(drawn, advantage)
        return loss, torch.tensor(float(reward.mean())), torch.tensor(float(base.mean()))


def scst_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float, amp: bool | None
) -> tuple[float, float, float]:
    """One SCST optimisation step on a data.Batch (its captions are not used): (loss, reward, baseline)."""
    with autocast(batch.features.device, amp):
        loss, reward, base = module(batch.features, batch.rows)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach()), float(reward), float(base)


def scst_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    epoch: int,
    cfg: TrainConfig,
    dist: Dist | None = None,
) -> dict:
    """One SCST pass over the training images: train_loss (the SCST loss, mean over steps), reward and baseline
    (means over steps, and over the ranks), seconds, samples_per_second (sampled captions, all ranks)."""
    dist = dist or Dist()
    module.train()
    t0 = time.perf_counter()
    loss_sum = reward_sum = base_sum = 0.0
    samples = 0
    with progress(len(batches), f"epoch {epoch}/{cfg.epochs} scst", unit="batch") as advance:
        for step, batch in enumerate(batches.iterate(epoch, cfg.seed), 1):
            loss, reward, base = scst_step(module, optimizer, batch, cfg.grad_clip, cfg.amp)
            loss_sum, reward_sum, base_sum = loss_sum + loss, reward_sum + reward, base_sum + base
            samples += len(batch.rows) * SAMPLES
            advance(1, reward=f"{reward_sum / step:.3f}", baseline=f"{base_sum / step:.3f}")
    seconds = time.perf_counter() - t0
    loss_sum, reward_sum, base_sum, samples = dist.sum(loss_sum, reward_sum, base_sum, samples)
    steps = len(batches) * dist.world
    record = {"phase": "scst", "train_loss": loss_sum / steps, "reward": reward_sum / steps}
    record |= {"baseline": base_sum / steps, "seconds": seconds, "samples_per_second": samples / seconds}
    if dist.enabled:
        record["processes"] = dist.world
    return record


def collapsing(records: list[dict]) -> bool:
    """Whether the mean reward fell in each of the last COLLAPSE_EPOCHS SCST epochs (the policy collapsing)."""
    rewards = [r["reward"] for r in records if r.get("phase") == "scst"][-(COLLAPSE_EPOCHS + 1) :]
    return len(rewards) == COLLAPSE_EPOCHS + 1 and all(b < a for a, b in zip(rewards, rewards[1:], strict=False))
