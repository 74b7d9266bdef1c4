"""Greedy and batched beam search over the decoder's step API; used by fit, evaluate and generate.
`decode_rows` decodes store rows, through the model's layer4 first when the store holds layer3 features."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import BEAM_SIZE
from pipeline.model import CaptionModel, Decoder
from pipeline.vocab import END_ID, PAD_ID, START_ID, UNK_ID

UNK_PENALTY = 1e4  # <unk> wins only when every other word is impossible


@dataclass
class Decoded:
    tokens: list[int]  # emitted word ids, without <start>/<end>
    attention: np.ndarray  # (len(tokens), P) attention weights for each emitted word
    score: float  # length-normalised log-probability (incl. <end> when emitted)
    beams: list[Decoded] = field(default_factory=list)  # with n_best: the n best finished hypotheses, best first


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(dim=-1)
    logp[..., PAD_ID] = -float("inf")
    logp[..., START_ID] = -float("inf")
    logp[..., UNK_ID] -= UNK_PENALTY
    return logp


@torch.inference_mode()
def greedy(model: Decoder, features: torch.Tensor, max_steps: int = 19) -> list[Decoded]:
    """Most likely word at each step until <end> or `max_steps` words; features (B, 7, 7, D)."""
    b = features.shape[0]
    state = model.init_state(features)
    tokens = torch.full((b, 1), START_ID, dtype=torch.long, device=features.device)
    out_tokens, out_alpha, total = [], [], torch.zeros(b, device=features.device)
    finished = torch.zeros(b, dtype=torch.bool, device=features.device)
    lengths = torch.full((b,), max_steps, device=features.device)
    for t in range(max_steps):
        logits, state, alpha = model.step(state, tokens)
        logp = _log_probs(logits[:, 0])
        best, tokens1 = logp.max(dim=-1)
        total = total + torch.where(finished, torch.zeros_like(best), best)
        newly = (~finished) & (tokens1 == END_ID)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        finished |= newly
        out_tokens.append(tokens1)
        out_alpha.append(alpha[:, 0])
        tokens = tokens1.unsqueeze(1)
        if bool(finished.all()):
            break
    toks = torch.stack(out_tokens, 1).cpu().numpy()
    alphas = torch.stack(out_alpha, 1).float().cpu().numpy()
    scores = (total / lengths).cpu().numpy()
    return [_trim(toks[i], alphas[i], float(scores[i])) for i in range(b)]


def _trim(tokens: np.ndarray, alpha: np.ndarray, score: float) -> Decoded:
    ends = np.flatnonzero(tokens == END_ID)
    n = int(ends[0]) if len(ends) else len(tokens)
    return Decoded([int(t) for t in tokens[:n]], alpha[:n], score)


@torch.inference_mode()
def beam_search(
    model: Decoder, features: torch.Tensor, beam_size: int = BEAM_SIZE, max_steps: int = 19, n_best: int = 0
) -> list[Decoded]:
    """Batched beam search: `beam_size` hypotheses per image, scored by log-probability over length.
    A hypothesis ends at <end>; the best ended one (or the best unfinished at `max_steps`) wins.
    beam_size 1 is exactly greedy.

    n_best > 0 also keeps, in each result's `beams`, the `n_best` best hypotheses that finished (ended, or
    reached `max_steps`) during the search, best first; the first is the result itself. It costs one small
    device-to-host copy per step, so evaluate and generate leave it off."""
    if beam_size <= 1:
        return _greedy_beams(model, features, max_steps, n_best)
    dev = features.device
    b, k = features.shape[0], beam_size
    state = model.init_state(features, groups=k)
    tokens = torch.full((b, k), START_ID, dtype=torch.long, device=dev)
    scores = torch.full((b, k), -float("inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: only the first one may expand
    history = torch.zeros((b, k, 0), dtype=torch.long, device=dev)
    alpha_hist: torch.Tensor | None = None
    best = _Best.empty(b, max_steps, dev)
    batch_idx = torch.arange(b, device=dev)
    finished: list[list[Decoded]] = [[] for _ in range(b)]  # n_best: every finished hypothesis, in order
    for t in range(max_steps):
        logits, state, alpha = model.step(state, tokens)  # (B, K, V), (B, K, P)
        logp = _log_probs(logits)
        vocab = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp).reshape(b, k * vocab)
        top, idx = cand.topk(k, dim=-1)  # (B, K)
        parent, word = idx // vocab, idx % vocab
        history, alpha_hist = _extend(history, alpha_hist, parent, word, alpha, t)
        ended = (word == END_ID) & torch.isfinite(top)
        last = t == max_steps - 1
        length = t + 1
        norm = torch.where(ended | (last & torch.isfinite(top)), top / length, torch.full_like(top, -float("inf")))
        if n_best:
            _collect(finished, norm, ended, history, alpha_hist, length)
        best.update(norm, ended, history, alpha_hist, length, batch_idx)
        scores = torch.where(ended, torch.full_like(top, -float("inf")), top)
        if _settled(best.score, scores, max_steps, finished, n_best):
            break
        tokens = word
        state = state.select(batch_idx, parent)
    out = best.results()
    for d, hyps in zip(out, finished, strict=True):
        # A stable sort keeps the search's order among equal scores, the order in which `best` was chosen.
        d.beams = sorted(hyps, key=lambda h: -h.score)[:n_best]
    return out


def _settled(
    best: torch.Tensor, live: torch.Tensor, max_steps: int, finished: list[list[Decoded]], n_best: int
) -> bool:
    """Whether the search can stop: no live hypothesis left (scores `live` (B, K), -inf when ended), or none that
    can still change the result: beat its image's best finished one (`best` (B,), length-normalised) or, with
    an n-best list, enter it (its n-th finished score). Exact: a live sum of log-probabilities s <= 0 only
    falls and its length is at most max_steps, so its normalised score can never exceed s / max_steps; a tie
    does not displace an earlier hypothesis (`_Best.update`, the n-best list's stable sort). A trained model's
    captions end after ~12 words: the search then stops instead of running the other beams to max_steps."""
    if not bool(torch.isfinite(live).any()):
        return True
    bound = live.max(dim=1).values / max_steps  # the most any live hypothesis of each image can still score
    if not n_best:
        return bool((best >= bound).all())
    for hyps, most in zip(finished, bound.tolist(), strict=True):
        scores = sorted((h.score for h in hyps), reverse=True)
        if len(scores) < n_best or scores[n_best - 1] < most:
            return False
    return True


def _greedy_beams(model: Decoder, features: torch.Tensor, max_steps: int, n_best: int) -> list[Decoded]:
    """beam_search with one beam: greedy, each result its own (only) n-best hypothesis when n_best is asked."""
    out = greedy(model, features, max_steps)
    if n_best:
        for d in out:
            d.beams = [Decoded(d.tokens, d.attention, d.score)]
    return out


def _extend(
    history: torch.Tensor,
    alpha_hist: torch.Tensor | None,
    parent: torch.Tensor,
    word: torch.Tensor,
    alpha: torch.Tensor,
    t: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K hypotheses' words (B, K, t+1) and attention (B, K, t+1, P) after step t: each parent's, reordered,
    then this step's `word` and its attention."""
    history = torch.cat([history.gather(1, parent.unsqueeze(-1).expand(-1, -1, t)), word.unsqueeze(-1)], -1)
    step_alpha = alpha.gather(1, parent.unsqueeze(-1).expand(-1, -1, alpha.shape[-1])).float()
    if alpha_hist is None:
        return history, step_alpha.unsqueeze(2)
    prev = alpha_hist.gather(1, parent[..., None, None].expand(-1, -1, t, alpha_hist.shape[-1]))
    return history, torch.cat([prev, step_alpha.unsqueeze(2)], 2)


@dataclass
class _Best:
    """The best finished hypothesis of each image so far, in beam_search."""

    score: torch.Tensor  # (B,) length-normalised
    tokens: torch.Tensor  # (B, max_steps), the first `length` of them its words
    length: torch.Tensor  # (B,)
    alpha: torch.Tensor | None = None  # (B, max_steps, P), made at the first step (when P is known)

    @classmethod
    def empty(cls, b: int, max_steps: int, dev: torch.device) -> _Best:
        return cls(
            torch.full((b,), -float("inf"), device=dev),
            torch.zeros((b, max_steps), dtype=torch.long, device=dev),
            torch.zeros((b,), dtype=torch.long, device=dev),
        )

    def update(
        self,
        norm: torch.Tensor,
        ended: torch.Tensor,
        history: torch.Tensor,
        alpha_hist: torch.Tensor,
        length: int,
        batch_idx: torch.Tensor,
    ) -> None:
        """Take this step's best finished hypothesis (finite `norm`, (B, K)) of each image that it beats."""
        b, max_steps = self.tokens.shape
        if self.alpha is None:
            self.alpha = torch.zeros((b, max_steps, alpha_hist.shape[-1]), device=self.tokens.device)
        cand_best, cand_k = norm.max(dim=1)
        better = cand_best > self.score
        if not bool(better.any()):
            return
        self.score = torch.where(better, cand_best, self.score)
        n_words = torch.where(ended[batch_idx, cand_k], length - 1, length)
        self.length = torch.where(better, n_words, self.length)
        row = torch.zeros((b, max_steps), dtype=torch.long, device=self.tokens.device)
        row[:, :length] = history[batch_idx, cand_k]
        self.tokens = torch.where(better.unsqueeze(-1), row, self.tokens)
        arow = torch.zeros_like(self.alpha)
        arow[:, :length] = alpha_hist[batch_idx, cand_k]
        self.alpha = torch.where(better[:, None, None], arow, self.alpha)

    def results(self) -> list[Decoded]:
        toks, lens = self.tokens.cpu().numpy(), self.length.cpu().numpy()
        alphas, sc = self.alpha.cpu().numpy(), self.score.cpu().numpy()
        return [
            Decoded([int(x) for x in toks[i, : lens[i]]], alphas[i, : lens[i]], float(sc[i])) for i in range(len(toks))
        ]


def _collect(
    finished: list[list[Decoded]],
    norm: torch.Tensor,
    ended: torch.Tensor,
    history: torch.Tensor,
    alpha_hist: torch.Tensor,
    length: int,
) -> None:
    """Append this step's finished hypotheses (finite `norm`, (B, K)) to each image's list, in beam order."""
    where = torch.isfinite(norm).nonzero()  # (F, 2): image, beam
    if len(where) == 0:
        return
    i, j = where[:, 0], where[:, 1]
    rows = zip(
        i.tolist(),
        norm[i, j].tolist(),
        ended[i, j].tolist(),
        history[i, j].cpu().numpy(),
        alpha_hist[i, j].cpu().numpy(),
        strict=True,
    )
    for image, score, has_end, tokens, alpha in rows:
        n = length - 1 if has_end else length  # <end> is scored but not a word
        finished[image].append(Decoded([int(x) for x in tokens[:n]], alpha[:n], float(score)))


def decode_rows(
    model: Decoder | CaptionModel,
    features: np.ndarray,
    rows: np.ndarray,
    device: torch.device,
    beam_size: int = BEAM_SIZE,
    max_steps: int = 19,
    batch_size: int = 128,
) -> list[Decoded]:
    """Decode store rows (from the memory map) in batches. A CaptionModel encodes them first (its layer4 on a
    layer3 store's rows), so a Decoder takes layer4 rows, a CaptionModel the rows of the store it was made for."""
    decoder, encode = (model.decoder, model.encode) if isinstance(model, CaptionModel) else (model, None)
    out: list[Decoded] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        order = np.argsort(chunk)
        feats = torch.from_numpy(np.ascontiguousarray(features[chunk[order]])).to(device)
        if encode is not None:
            with torch.inference_mode():
                feats = encode(feats)
        decoded = beam_search(decoder, feats, beam_size, max_steps)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        out.extend(decoded[j] for j in back)
    return out
