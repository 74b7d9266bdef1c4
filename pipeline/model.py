"""The report's attention-LSTM decoder, implemented for speed without changing its function.

Per step t, with image features F (P=49 positions x 2048) and previous state (h, c):

    e     = fc(tanh(f_att(F) + h_att(h)))           # (P,) additive attention scores
    alpha = softmax(e)                               # over the 49 grid cells
    ctx   = sum_p alpha_p F_p                        # (2048,)
    [i, f, g, o] = W [emb(w_t); h; ctx] + b          # the report's Wi, Wf, Wc, Wo fused in one matmul
    c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c')
    logits = fc_out(h')

with (h, c) = 0 at the start (the report's), or with `init_from_grid` K (fit's default, 8):

    [h0; c0] = tanh(W_grid [U (F_1 - m_1); ...; U (F_P - m_P)] + b)   # U: 2048 -> K, shared by the cells

where m_p is cell p's mean over the train split's features (the buffer `grid_mean`).

Speed without changing the function:
- the four gate Linears are one (2860 -> 4x512) matmul, split by column into its word, hidden and
  context parts; the word part is computed for all steps at once, before the recurrence;
- the hidden-state part of the gates and h_att(h) are one matmul per step (their weights concatenated);
- f_att(F) is computed once per image, not once per step;
- fc_out runs once over all steps after the recurrence.

Decoding (the step API: greedy, beam search, SCST's samples), one step at a time for a few sequences:
- the context part of the gates is computed once per image, W_ctx F_p for each cell (`init_state`);
- on a CPU, a few rows' matmuls run as W x^T (`linear`);
- a loaded model (`Decoder.for_inference`: generate, serve, evaluate) looks the word part up in a table of
  every word's, made once (`StepWeights.table`).

Every tensor carries a group axis G: G captions (training with several captions per image) or G beams
(beam search) share one image's features and their projection, which are never copied G times.

Beyond the report (`init_from_grid`, fit's default; off here, so that a DecoderConfig is the report's unless
asked): h0/c0 from the whole feature grid, read through a few numbers per cell.

Show, Attend and Tell options (off by default = the report's model): h0/c0 from the mean feature,
dropout before the output layer, the gating scalar beta on the context. The doubly stochastic attention
penalty is a loss term: it lives with the losses, in pipeline/loss.py.

The layer sizes come in named presets, as timm names its test models: "report" (the default) and "tiny",
a narrow decoder that the tests and smoke runs select by name (`fit --decoder tiny`).

`CaptionModel` is what fit trains and evaluate and generate run: the decoder, with ResNet50's layer4 in front
of it when the store holds layer3 features (trained with `fit --finetune layer4`, or run frozen). It is one
module whose forward computes what the loss needs, so that a wrapper such as DDP wraps the whole of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int = 2048
    embed_dim: int = 300
    hidden_dim: int = 512
    attention_dim: int = 256
    init_from_features: bool = False  # SAT: h0, c0 = tanh(Linear(mean feature)); report: zeros
    dropout: float = 0.0  # SAT: dropout on h before the output layer
    gate: bool = False  # SAT: context scaled by sigmoid(Linear(h)) per feature channel
    # h0, c0 from the whole grid (fit's `--init-from-grid K`; 0: zeros, the report's): each cell's features
    # projected to K numbers, the grid_cells x K numbers joined, h0 and c0 = tanh(Linear(joined)). A glimpse (a
    # weighted mean of the cells) loses which cell holds what; this reads it once per image, as a linear
    # probe on the whole grid does (on the demo, shape: the grid 97.9%, one glimpse 88.5%; BENCHMARKS.md).
    # Each cell's features enter it less the train split's mean of that cell (the buffer `grid_mean`, set by
    # `set_grid_mean`): a random ResNet50's cells differ by position far more than by image (zero padding), and
    # with those offsets in, the state from the grid learned nothing (measured on the demo: shape 86.5-88.5%,
    # as without it, against 95.8-99.0%).
    init_from_grid: int = 0
    grid_cells: int = 49  # the cells init_from_grid's Linear reads: layer4 of a 224x224 image, 7x7
    # In teacher-forced training, each image's state from the grid is replaced by zeros with this probability,
    # so that attention still has to find what the words name (without it attention stopped looking at the
    # object: 1.1-1.6x its share instead of 2.6-4x on the demo). Inference always uses it.
    init_drop: float = 0.0
    # What the decoder does to its input features before anything else, fixed at the start of training from
    # the train split's features (`fit --feature-norm`). Since attention's context is linear in the features
    # and its weights sum to 1, both are the same function class as the raw features (they fold into f_att and
    # the context part of the gates): they only decide how well-conditioned training is.
    # feature_scale: features times this one number (fit's `rms`: 1/RMS of the training features, the default
    # before per-channel statistics; 1 = the report's raw features).
    feature_scale: float = 1.0
    # feature_norm: each of the D channels standardised, (x - mean_c) / std_c, with the statistics held in the
    # buffers `feature_mean` and `feature_inv_std` (so they travel in the state_dict). Measured on the demo:
    # a random ResNet50's channels differ in scale by orders of magnitude, a few large ones drown the rest,
    # and the decoder names the colour of 42% of the test images instead of 100% (BENCHMARKS.md).
    feature_norm: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **kw) -> DecoderConfig:
        """The layer sizes of preset `name` (see DECODER_PRESETS) with the other fields from `kw`."""
        if name not in DECODER_PRESETS:
            raise ValueError(f"unknown decoder {name!r} (known: {', '.join(DECODER_PRESETS)})")
        return cls(**(DECODER_PRESETS[name] | kw))


# Layer sizes by name. "report" is the report's decoder; "tiny" keeps the 2048 feature channels of the store
# and narrows the rest, so that the tests train many epochs within a CPU budget.
DECODER_PRESETS: dict[str, dict[str, int]] = {
    "report": {"embed_dim": 300, "hidden_dim": 512, "attention_dim": 256},
    "tiny": {"embed_dim": 16, "hidden_dim": 32, "attention_dim": 16},
}


@dataclass
class DecoderState:
    """Recurrent state for B images x G sequences each, plus the per-image tensors the steps reuse."""

    h: torch.Tensor  # (B, G, H)
    c: torch.Tensor  # (B, G, H)
    features: torch.Tensor  # (B, P, D)
    projected: torch.Tensor  # (B, P, A) = f_att(features), once per image
    # The step API's per-image tensors (Decoder.init_state with `for_steps`), None in teacher-forced training:
    # context_gates (B, P, 4H) = W_ctx F_p, each cell's contribution to the gates, so that a step's context
    # part is alpha @ context_gates instead of W_ctx (alpha @ F); weights: the step's weight matrices, joined
    # once instead of at every step.
    context_gates: torch.Tensor | None = None
    weights: StepWeights | None = None

    def select(self, image_index: torch.Tensor, group_index: torch.Tensor) -> DecoderState:
        """Reorder sequences within each image: new h[b, g] = h[b, group_index[b, g]] (beam search)."""
        idx = group_index.unsqueeze(-1).expand(-1, -1, self.h.shape[-1])
        return self.advance(self.h.gather(1, idx), self.c.gather(1, idx))

    def advance(self, h: torch.Tensor, c: torch.Tensor) -> DecoderState:
        """The state after a step: new h and c, the same per-image tensors."""
        return DecoderState(h, c, self.features, self.projected, self.context_gates, self.weights)


@dataclass
class StepWeights:
    """The decoder's weights arranged for the recurrence: the gates' word part with the gates' bias, their
    hidden part joined with h_att (and f_beta) into one matmul, and their context part."""

    word: torch.Tensor  # (4H, E)
    bias: torch.Tensor  # (4H,)
    hidden: torch.Tensor  # (4H + A [+ D], H)
    hidden_bias: torch.Tensor
    context: torch.Tensor  # (4H, D)
    # The word part of every word, W_e emb(v) + b (V, 4H): a step's word part is then a row lookup instead of a
    # matmul. Only for a decoder marked `for_inference`, from its second decode with the same weights.
    table: torch.Tensor | None = None


class _StepCache:
    """The StepWeights of a decoder marked `for_inference`, kept while its parameters keep their address and
    version counter. It holds the parameters it was made from (detached: the same memory and version counter),
    so that no other tensor can take their place at the same address."""

    def __init__(self, sources: list[torch.Tensor], weights: StepWeights) -> None:
        self.sources = [t.detach() for t in sources]
        self.versions = [t._version for t in self.sources]
        self.weights = weights

    def matches(self, sources: list[torch.Tensor]) -> bool:
        return len(sources) == len(self.sources) and all(
            new.data_ptr() == old.data_ptr() and new.dtype == old.dtype and new._version == version
            for new, old, version in zip(sources, self.sources, self.versions, strict=True)
        )


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.f_att = nn.Linear(cfg.feature_dim, cfg.attention_dim)
        self.h_att = nn.Linear(cfg.hidden_dim, cfg.attention_dim)
        self.fc = nn.Linear(cfg.attention_dim, 1)

    def weights(self, projected: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """projected (B, P, A), query = h_att(h) (B, G, A) -> alpha (B, G, P)."""
        scores = self.fc(torch.tanh(projected.unsqueeze(1) + query.unsqueeze(2))).squeeze(-1)  # (B, G, P)
        return scores.softmax(dim=-1)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.attention = Attention(cfg)
        # The report's Wi, Wf, Wc, Wo (each Linear(2860 -> 512)) stacked as rows [i; f; c; o].
        self.gates = nn.Linear(cfg.embed_dim + cfg.hidden_dim + cfg.feature_dim, 4 * cfg.hidden_dim)
        self.fc_out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.init_from_features:
            self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
            self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        if cfg.gate:
            self.f_beta = nn.Linear(cfg.hidden_dim, cfg.feature_dim)
        if cfg.init_from_features and cfg.init_from_grid:
            raise ValueError("init_from_features and init_from_grid both set h0 and c0: choose one")
        if cfg.init_from_grid:
            self.init_cells = nn.Linear(cfg.feature_dim, cfg.init_from_grid)
            self.init_grid = nn.Linear(cfg.grid_cells * cfg.init_from_grid, 2 * cfg.hidden_dim)
            self.register_buffer("grid_mean", torch.zeros(cfg.grid_cells, cfg.feature_dim))
        self._inference = False  # `for_inference`
        self._step_cache: _StepCache | None = None  # its step weights, kept between decodes
        if cfg.feature_norm:  # identity until fit sets them (`set_feature_stats`)
            self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
            self.register_buffer("feature_inv_std", torch.ones(cfg.feature_dim))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel statistics of the training features (D,) that `feature_norm` standardises with."""
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_inv_std.copy_(1.0 / std)

    def set_grid_mean(self, cell_mean: torch.Tensor) -> None:
        """Each cell's mean of the training features (cells, D), as stored: `init_from_grid` subtracts it (in
        the normalised space the decoder reads) from each cell. Set after `set_feature_stats`."""
        with torch.no_grad():
            self.grid_mean.copy_(self.normalise(cell_mean.unsqueeze(0)).squeeze(0))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, 7, 7, D) or (B, P, D), any float dtype -> (B, P, D) in the weights' dtype, scaled and
        standardised as `feature_scale` and `feature_norm` say: what attention and the gates read."""
        dtype = self.gates.weight.dtype
        feats = features.reshape(features.shape[0], -1, features.shape[-1]).to(dtype)  # (B, P, D)
        if self.cfg.feature_scale != 1.0:
            feats = feats * self.cfg.feature_scale
        if self.cfg.feature_norm:
            feats = (feats - self.feature_mean.to(dtype)) * self.feature_inv_std.to(dtype)
        return feats

    # -- the weights, split the way the fast path uses them ------------------------------------------
    def for_inference(self) -> Decoder:
        """Mark this decoder's weights as fixed from now on (generate, serve, evaluate: a loaded model): decoding
        then keeps its step weights between calls, and from the second decode adds the word table
        (`StepWeights.table`, V x 4H floats: 61 MB at V = 7,456, made in ~60 ms on 2 CPU cores; it saves a
        matmul a step: BENCHMARKS.md, latency). A single caption never pays for the table.

        `train()` ends it. So do new weights in another way that torch sees (load_state_dict, a change in place,
        `.to()` another device or dtype): the kept weights are checked against the parameters' addresses and
        version counters at each decode. An optimizer step is not always seen (fused Adam does not move the
        version counters): that is why it is asked for, not guessed. Returns the decoder."""
        self._inference = True
        return self

    def train(self, mode: bool = True) -> Decoder:
        if mode:
            self._inference, self._step_cache = False, None
        return super().train(mode)

    def step_weights(self) -> StepWeights:
        """The gates' weights split by input (word, hidden, context), with one matmul on h for the gates' hidden
        part and the attention query (and the SAT gate). Made afresh at each call (in the graph when grad is
        enabled: SCST's samples), except after `for_inference`, where decoding keeps them."""
        if torch.is_grad_enabled() or not self._inference:
            return self._join_weights()
        sources = list(self.parameters())
        if any(p.is_inference() for p in sources):  # made under inference_mode: no version counter to watch
            return self._join_weights()
        cache = self._step_cache
        if cache is None or not cache.matches(sources):
            self._step_cache = _StepCache(sources, self._join_weights())
        elif cache.weights.table is None and not torch.is_autocast_enabled(sources[0].device.type):
            # (under autocast the table would be made, and kept, in bf16 or fp16)
            cache.weights.table = F.linear(self.embedding.weight, cache.weights.word, cache.weights.bias)
        return self._step_cache.weights

    def _join_weights(self) -> StepWeights:
        e, h = self.cfg.embed_dim, self.cfg.hidden_dim
        w = self.gates.weight
        parts_w = [w[:, e : e + h], self.attention.h_att.weight]
        parts_b = [torch.zeros_like(self.gates.bias), self.attention.h_att.bias]
        if self.cfg.gate:
            parts_w.append(self.f_beta.weight)
            parts_b.append(self.f_beta.bias)
        return StepWeights(w[:, :e], self.gates.bias, torch.cat(parts_w, 0), torch.cat(parts_b, 0), w[:, e + h :])

    # -- step API ---------------------------------------------------------------------------------------
    def init_state(
        self, features: torch.Tensor, groups: int = 1, for_steps: bool = True, drop: bool = False
    ) -> DecoderState:
        """features (B, 7, 7, D) or (B, P, D), any float dtype -> state for `groups` sequences per image.
        `drop`: training's `init_drop` (teacher-forced training passes it; decoding never does).

        `for_steps` (the step API: greedy, beam search, SCST's samples) also computes what every step reuses:
        the joined weights, and each cell's contribution to the gates, W_ctx F_p (B, P, 4H), once per image.
        A step's context part is then alpha @ (W_ctx F) instead of W_ctx (alpha @ F): the same sum in another
        order, and the 2048 x 2048 matrix is read once instead of at every step (on a CPU, at beam 3, reading
        it was most of a step). Not with the SAT gate, which scales the context per channel before W_ctx."""
        feats = self.normalise(features)
        b, hdim = feats.shape[0], self.cfg.hidden_dim
        if self.cfg.init_from_features:
            mean = feats.mean(dim=1)  # (B, D)
            h = torch.tanh(self.init_h(mean)).unsqueeze(1).expand(b, groups, hdim).contiguous()
            c = torch.tanh(self.init_c(mean)).unsqueeze(1).expand(b, groups, hdim).contiguous()
        elif self.cfg.init_from_grid:
            h, c = self._grid_state(feats, groups, drop)
        else:
            h = feats.new_zeros(b, groups, hdim)
            c = feats.new_zeros(b, groups, hdim)
        state = DecoderState(h, c, feats, self.attention.f_att(feats))
        if for_steps:
            state.weights = self.step_weights()
            if not self.cfg.gate:
                state.context_gates = F.linear(feats, state.weights.context)
        return state

    def _grid_state(self, feats: torch.Tensor, groups: int, drop: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """h0, c0 (B, groups, H) from the whole grid of normalised features (B, P, D): `init_from_grid`."""
        b, cells, hdim = feats.shape[0], feats.shape[1], self.cfg.hidden_dim
        if cells != self.cfg.grid_cells:
            raise ValueError(f"the decoder reads grids of {self.cfg.grid_cells} cells, not {cells}")
        centred = feats - self.grid_mean.to(feats.dtype)
        state = torch.tanh(self.init_grid(self.init_cells(centred).reshape(b, -1)))  # (B, 2H)
        if drop and self.cfg.init_drop > 0:
            state = state * (torch.rand(b, 1, device=state.device) >= self.cfg.init_drop).to(state.dtype)
        state = state.unsqueeze(1).expand(b, groups, 2 * hdim)
        return state[..., :hdim].contiguous(), state[..., hdim:].contiguous()

    def _cell(
        self, word_gates: torch.Tensor, state: DecoderState, weights: StepWeights
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One recurrence step. word_gates (B, G, 4H) already holds W_e emb + b. Returns h, c, alpha."""
        hdim, adim = self.cfg.hidden_dim, self.cfg.attention_dim
        hid = linear(state.h, weights.hidden, weights.hidden_bias)  # (B, G, 4H + A [+ D])
        hid_gates, query = hid[..., : 4 * hdim], hid[..., 4 * hdim : 4 * hdim + adim]
        alpha = self.attention.weights(state.projected, query)  # (B, G, P)
        if state.context_gates is not None:
            context_gates = torch.bmm(alpha, state.context_gates)  # (B, G, 4H)
        else:
            context = torch.bmm(alpha, state.features)  # (B, G, D)
            if self.cfg.gate:
                context = torch.sigmoid(hid[..., 4 * hdim + adim :]) * context
            context_gates = F.linear(context, weights.context)
        gates = word_gates + hid_gates + context_gates  # (B, G, 4H)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, alpha

    def step(self, state: DecoderState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """tokens (B, G) -> logits (B, G, V), the next state, attention weights alpha (B, G, P)."""
        weights = state.weights if state.weights is not None else self.step_weights()
        if weights.table is not None:
            word_gates = F.embedding(tokens, weights.table)
        else:
            word_gates = linear(self.embedding(tokens), weights.word, weights.bias)
        h, c, alpha = self._cell(word_gates, state, weights)
        logits = linear(self.dropout(h), self.fc_out.weight, self.fc_out.bias)
        return logits, state.advance(h, c), alpha

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        active: list[int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced: features (B, 7, 7, D), tokens (B, G, T) inputs -> logits (B, G, T, V),
        alphas (B, G, T, P). Uses the same cell as `step`. `active`: see `recurrence`; `keep` (B, G, T) bool:
        logits of those steps only, (K, V) (training skips the <pad> steps)."""
        hidden, alphas = self.recurrence(features, tokens, active)
        if keep is not None:
            hidden = hidden[keep]  # (K, H)
        return self.head(hidden), alphas

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., H) -> logits (..., V). Training applies it to the non-<pad> steps only."""
        return self.fc_out(self.dropout(hidden))

    def recurrence(
        self, features: torch.Tensor, tokens: torch.Tensor, active: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced recurrence without the output layer: hidden (B, G, T, H), alphas (B, G, T, P).

        `active[t]`, for images sorted by decreasing caption length, is how many images still need step t:
        only that prefix is computed (views, no copies), as Show, Attend and Tell does. The other images
        keep their state and their outputs at that step are stale: only for callers that mask them."""
        b, g, t = tokens.shape
        state = self.init_state(features, groups=g, for_steps=False, drop=self.training)
        weights = self._join_weights()
        word_gates = F.linear(self.embedding(tokens), weights.word, weights.bias)  # (B, G, T, 4H), all steps at once
        hs, alphas = [], []
        for step in range(t):
            n = b if active is None else active[step]
            if n >= b:
                h, c, alpha = self._cell(word_gates[:, :, step], state, weights)
            else:
                sub = DecoderState(state.h[:n], state.c[:n], state.features[:n], state.projected[:n])
                h_n, c_n, a_n = self._cell(word_gates[:n, :, step], sub, weights)
                h, c = torch.cat([h_n, state.h[n:]]), torch.cat([c_n, state.c[n:]])
                alpha = torch.cat([a_n, a_n.new_zeros(b - n, *a_n.shape[1:])])
            state = state.advance(h, c)
            hs.append(h)
            alphas.append(alpha)
        return torch.stack(hs, dim=2), torch.stack(alphas, dim=2)  # (B, G, T, H), (B, G, T, P)


FEW_ROWS = 16  # up to this many rows on a CPU, `linear` computes W x^T


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K), weight (N, K): the same products, computed as W x^T when x has at
    most FEW_ROWS rows on a CPU, as a beam search's step has (3 at beam 3). There MKL's x W^T was slower on the
    same weights: fc_out at V = 7,456 2-3x (1,236 against 597 us with spinning threads, 3,258 against 1,151 us
    with passive ones), the gates' hidden part 1.4x with spinning threads and about even with passive ones; the
    whole search with the table, `linear` everywhere against it for fc_out alone: 50-54 against 53-63 ms
    (passive; BENCHMARKS.md, latency). The result is made contiguous before the bias is added: a transposed
    result would slow each small operation after it."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > FEW_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, -1).t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def compile_cell(decoder: Decoder) -> None:
    """`fit --compile`: torch.compile the recurrence's step, `Decoder._cell` (attention, gates, LSTM update),
    whose dozen small operations become a few fused kernels, forward and backward. Its batch dimension is
    dynamic: the images still active shrink step by step, and the caption lengths differ from batch to
    batch. (Compiling the whole loss instead specialised on those lengths: it compiled again for nearly every
    batch, minutes on end, and then ran uncompiled.)"""
    decoder._cell = torch.compile(decoder._cell, dynamic=True)


def run_encoder(encoder: nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """A convolutional stage on channels-last rows: (B, 14, 14, 1024) -> (B, 7, 7, 2048) for layer4."""
    x = stored.to(next(encoder.parameters()).dtype).permute(0, 3, 1, 2)  # (B, C, h, w) view, channels-last memory
    return encoder(x).permute(0, 2, 3, 1)  # (B, 7, 7, 2048)


class CaptionModel(nn.Module):
    """The decoder, and `encoder`: the part of the encoder that runs on the stored features, between the store
    and the decoder. None for a layer4 store; ResNet50's layer4 (pipeline.encoder.layer4_head) for a layer3
    one, trained with the decoder (`fit --finetune layer4`) or frozen.

    `train_encoder` False runs the encoder under no_grad (frozen, or fit's decoder-only epochs before
    `--finetune-after`): no activations are kept for a backward pass, and its weights get no gradient."""

    def __init__(self, decoder: Decoder, encoder: nn.Module | None = None, train_encoder: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        # channels-last weights for channels-last inputs (the stored rows are (B, h, w, C))
        self.encoder = encoder.to(memory_format=torch.channels_last) if encoder is not None else None
        self.train_encoder = train_encoder and encoder is not None

    def encode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored features (B, h, w, C), any float dtype -> the decoder's features (B, 7, 7, D)."""
        if self.encoder is None:
            return stored
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            return run_encoder(self.encoder, stored)

    def forward(
        self,
        stored: torch.Tensor,
        tokens: torch.Tensor,
        active: list[int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder.forward on the encoded features: one image's features are computed once for its G captions."""
        return self.decoder(self.encode(stored), tokens, active, keep)


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
