"""The fused attention-LSTM decoder against a plain four-gate implementation, its losses, and decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decode import Decoded, beam_search, decode_rows, greedy
from pipeline.loss import attention_penalty, caption_loss, masked_loss
from pipeline.model import Decoder, DecoderConfig, linear
from pipeline.vocab import END_ID, PAD_ID, START_ID, UNK_ID

V = 30  # a small vocabulary: the layer sizes are the report's (2048/300/512/256)
P = 49


def _model(seed: int = 0, **flags) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=V, **flags))


def _features(b: int, seed: int = 1, dim: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 7, 7, dim, generator=g) * 2.0


# Decoding does not depend on the layer sizes: its tests use a narrow decoder on 64-channel features.
NARROW = {"feature_dim": 64, "embed_dim": 16, "hidden_dim": 32, "attention_dim": 16}
NARROW_D = NARROW["feature_dim"]


def _narrow_model(seed: int) -> Decoder:
    return _model(seed, **NARROW)


def _tokens(b: int, g: int, t: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (b, g, t), generator=gen)
    tokens[..., 0] = START_ID
    return tokens


class FourGateReference(nn.Module):
    """The report's cell written plainly, one sequence at a time: separate Wi, Wf, Wc, Wo on
    [emb(w); h_prev; ctx], additive attention recomputing f_att(F) at every step, fc_out after each step."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        cfg = model.cfg
        self.cfg = cfg
        h = cfg.hidden_dim
        n_in = cfg.embed_dim + cfg.hidden_dim + cfg.feature_dim
        w, b = model.gates.weight.detach(), model.gates.bias.detach()
        self.W = {}
        for k, name in enumerate("ifco"):  # rows [i; f; c; o], the chunk order of Decoder._cell
            lin = nn.Linear(n_in, h)
            with torch.no_grad():
                lin.weight.copy_(w[k * h : (k + 1) * h])
                lin.bias.copy_(b[k * h : (k + 1) * h])
            self.W[name] = lin
        self.model = model  # embedding, attention, fc_out, SAT layers: used as plain modules

    @torch.no_grad()
    def sequence(self, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (P, D), tokens (T,) -> logits (T, V), alphas (T, P)."""
        m, cfg = self.model, self.cfg
        feats = feats * cfg.feature_scale
        if cfg.init_from_features:
            mean = feats.mean(0)
            h, c = torch.tanh(m.init_h(mean)), torch.tanh(m.init_c(mean))
        elif cfg.init_from_grid:  # each cell's K numbers, cell after cell, through one Linear
            joined = torch.cat([m.init_cells(feats[p]) for p in range(feats.shape[0])])
            h, c = torch.tanh(m.init_grid(joined)).split(cfg.hidden_dim)
        else:
            h, c = torch.zeros(cfg.hidden_dim), torch.zeros(cfg.hidden_dim)
        logits, alphas = [], []
        for w in tokens:
            scores = m.attention.fc(torch.tanh(m.attention.f_att(feats) + m.attention.h_att(h))).squeeze(-1)
            alpha = torch.softmax(scores, dim=0)  # (P,)
            ctx = (alpha[:, None] * feats).sum(0)  # (D,)
            if cfg.gate:
                ctx = torch.sigmoid(m.f_beta(h)) * ctx
            x = torch.cat([m.embedding(w), h, ctx])
            i = torch.sigmoid(self.W["i"](x))
            f = torch.sigmoid(self.W["f"](x))
            g = torch.tanh(self.W["c"](x))
            o = torch.sigmoid(self.W["o"](x))
            c = f * c + i * g
            h = o * torch.tanh(c)
            logits.append(m.fc_out(h))
            alphas.append(alpha)
        return torch.stack(logits), torch.stack(alphas)


def test_forward_shapes_and_attention_is_a_distribution():
    model = _model().eval()
    logits, alphas = model(_features(3), _tokens(3, 2, 5))
    assert logits.shape == (3, 2, 5, V)
    assert alphas.shape == (3, 2, 5, P)
    assert torch.isfinite(logits).all()
    assert (alphas >= 0).all()
    torch.testing.assert_close(alphas.sum(-1), torch.ones(3, 2, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("groups", "flags"),
    [
        (1, {}),
        (2, {}),
        (2, {"init_from_features": True, "gate": True, "feature_scale": 0.5}),
        (2, {"init_from_grid": 4, "init_drop": 0.5}),
    ],
    ids=["G1", "G2", "G2-sat", "G2-grid"],
)
def test_fused_cell_equals_plain_four_gate_reference(groups, flags):
    model = _model(seed=3, **flags).eval()
    with torch.no_grad():  # non-zero biases everywhere, so that a misplaced bias shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    b, t = 2, 4
    feats, tokens = _features(b), _tokens(b, groups, t)
    with torch.no_grad():
        logits, alphas = model(feats, tokens)
    ref = FourGateReference(model)
    flat = feats.reshape(b, P, 2048)
    for i in range(b):
        for g in range(groups):
            ref_logits, ref_alphas = ref.sequence(flat[i], tokens[i, g])
            torch.testing.assert_close(logits[i, g], ref_logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(alphas[i, g], ref_alphas, atol=1e-5, rtol=0)


def test_groups_share_the_image_but_not_the_sequence():
    """Two captions of one image decoded in one group give what each gives alone."""
    model = _narrow_model(seed=0).eval()
    feats, tokens = _features(2, dim=NARROW_D), _tokens(2, 2, 5)
    with torch.no_grad():
        both, _ = model(feats, tokens)
        first, _ = model(feats, tokens[:, :1])
        second, _ = model(feats, tokens[:, 1:])
    torch.testing.assert_close(both[:, :1], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[:, 1:], second, atol=1e-5, rtol=0)
    assert not torch.allclose(both[:, 0], both[:, 1])


@pytest.mark.parametrize(
    "flags",
    [{}, {"init_from_features": True, "gate": True}, {"init_from_grid": 8, "init_drop": 0.5}],
    ids=["report", "sat", "grid"],
)
def test_step_api_matches_teacher_forced_forward(flags):
    model = _model(**flags).eval().for_inference()
    feats, tokens = _features(2), _tokens(2, 3, 5)
    with torch.no_grad():
        logits, alphas = model(feats, tokens)
        for with_table in (False, True):  # for_inference: the second decode reads the word table
            state = model.init_state(feats, groups=3)
            assert (state.weights.table is not None) == with_table
            for t in range(tokens.shape[-1]):
                step_logits, state, alpha = model.step(state, tokens[:, :, t])
                torch.testing.assert_close(step_logits, logits[:, :, t], atol=1e-5, rtol=0)
                torch.testing.assert_close(alpha, alphas[:, :, t], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_linear_for_few_rows_is_f_linear(rows):
    """`linear` computes W x^T for up to FEW_ROWS rows on a CPU: the same values and gradients as F.linear."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 2, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    out = linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert out.is_contiguous() and out.shape == (rows, 2, 40)
    grads = torch.autograd.grad(out.square().sum(), (x, w, b))
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (x, w, b)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=0)


def _decode(model: Decoder, feats: torch.Tensor) -> list[Decoded]:
    return beam_search(model, feats, beam_size=3, max_steps=8, n_best=3)


def _same_decoding(a: list[Decoded], b: list[Decoded]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens and [h.tokens for h in x.beams] == [h.tokens for h in y.beams]
        assert x.score == pytest.approx(y.score, abs=1e-5)


def test_decoding_follows_the_weights_when_they_change():
    """A decoder marked for_inference keeps its step weights and word table between decodes. load_state_dict, a
    change in place, a change of dtype, and training (train() ends it; fused Adam moves no version counter) must
    each be decoded with the new weights, as a fresh decoder decodes them."""
    from pipeline.train import make_optimizer

    model = _narrow_model(seed=3).eval().for_inference()
    feats = _features(3, seed=4, dim=NARROW_D)
    for _ in range(2):  # the second makes the word table
        _decode(model, feats)
    assert model._step_cache.weights.table is not None

    def fresh() -> Decoder:
        twin = _narrow_model(seed=99).eval()
        twin.load_state_dict(model.state_dict())
        return twin

    other = _narrow_model(seed=5).eval()
    model.load_state_dict(other.state_dict())
    _same_decoding(_decode(model, feats), _decode(other, feats))

    with torch.no_grad():
        model.embedding.weight[9].mul_(-3.0)
    _same_decoding(_decode(model, feats), _decode(fresh(), feats))

    before = [_decode(model, feats) for _ in range(2)][-1]
    model.train()
    opt = make_optimizer(model, 0.5)  # fit's Adam (fused where torch has it); a large rate: the captions change
    logits, _ = model(feats, _tokens(3, 1, 6))
    (-logits[..., 9].mean()).backward()  # every step towards word 9
    opt.step()
    model.eval()
    after = _decode(model, feats)
    _same_decoding(after, _decode(fresh(), feats))
    assert [d.tokens for d in after] != [d.tokens for d in before]
    assert model._step_cache is None  # training ended for_inference: decoding no longer keeps step weights

    model.for_inference()
    for _ in range(2):
        _decode(model, feats)
    model.double()
    _same_decoding(_decode(model, feats.double()), _decode(fresh().double(), feats.double()))


def test_sampling_with_grad_after_decoding_trains_every_step_weight():
    """Decoding with grad enabled (SCST's samples) never uses kept step weights, even after for_inference and
    no-grad decodes: the word, hidden and context parts of the gates, h_att and fc_out all get gradients."""
    from pipeline.scst import sample

    model = _narrow_model(seed=6).eval().for_inference()
    feats = _features(2, seed=7, dim=NARROW_D)
    with torch.no_grad():
        for _ in range(2):
            _decode(model, feats)
    assert model._step_cache.weights.table is not None
    torch.manual_seed(0)
    drawn = sample(model, feats, k=2, max_steps=5)
    drawn.log_probs.sum().backward()
    for p in (model.embedding.weight, model.gates.weight, model.attention.h_att.weight, model.fc_out.weight):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_the_word_table_is_made_in_the_weights_dtype_even_under_autocast():
    """A decode under autocast (bf16 on a CPU) must not make, and keep, the word table in bf16 for the decodes
    after it: the table waits for a decode without autocast, and is then float32."""
    model = _narrow_model(seed=4).eval().for_inference()
    feats = _features(2, seed=5, dim=NARROW_D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            _decode(model, feats)
    assert model._step_cache.weights.table is None
    _decode(model, feats)
    assert model._step_cache.weights.table.dtype == torch.float32


def test_a_decoder_made_under_inference_mode_decodes():
    """Parameters made under inference_mode have no version counter to watch: decoding joins the step weights
    afresh each time and gives what a decoder made outside it gives."""
    feats = _features(2, seed=8, dim=NARROW_D)
    with torch.inference_mode():
        model = _narrow_model(seed=2).eval().for_inference()
        first, second = _decode(model, feats), _decode(model, feats)
    _same_decoding(first, second)
    _same_decoding(first, _decode(_narrow_model(seed=2).eval(), feats))


def test_state_select_reorders_sequences():
    model = _narrow_model(seed=0).eval()
    feats = _features(2, dim=NARROW_D)
    with torch.no_grad():
        state = model.init_state(feats, groups=3)
        _, state, _ = model.step(state, torch.tensor([[5, 6, 7], [8, 9, 10]]))
        picked = state.select(torch.arange(2), torch.tensor([[2, 2, 0], [1, 0, 1]]))
    torch.testing.assert_close(picked.h[0], state.h[0][[2, 2, 0]])
    torch.testing.assert_close(picked.c[1], state.c[1][[1, 0, 1]])
    assert picked.features is state.features


@pytest.mark.parametrize(
    "flags",
    [{}, {"init_from_features": True, "dropout": 0.5, "gate": True}, {"init_from_grid": 8, "init_drop": 0.5}],
    ids=["report", "all-sat-flags", "grid"],
)
def test_every_parameter_gets_a_finite_nonzero_gradient(flags):
    model = _model(**flags).train()
    torch.manual_seed(0)  # init_drop: this seed keeps at least one image's state from the grid
    tokens = _tokens(2, 2, 6)
    tokens[0, 1, 4:] = PAD_ID  # a shorter caption
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    logits, alphas = model(_features(2), inputs)
    loss = masked_loss(logits, targets) + attention_penalty(alphas, targets)
    loss.backward()
    assert torch.isfinite(loss)
    names = {n for n, _ in model.named_parameters()}
    if flags.get("init_from_features"):
        assert {"init_h.weight", "init_c.weight", "f_beta.weight"} <= names
    if flags.get("init_from_grid"):
        assert {"init_cells.weight", "init_grid.weight"} <= names
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_init_drop_zeroes_some_images_state_in_training_only():
    """init_drop: teacher-forced training starts that share of the images from zeros (the report's state) and
    the rest from the grid; evaluation and the step API (decoding, SCST's samples) never drop."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=V, **NARROW, init_from_grid=4, init_drop=0.5))
    feats = _features(200, dim=NARROW_D)
    torch.manual_seed(0)
    dropped = model.init_state(feats, drop=True)
    zero = (dropped.h == 0).all(-1).squeeze(1) & (dropped.c == 0).all(-1).squeeze(1)
    assert 70 <= int(zero.sum()) <= 130  # about half
    kept = model.init_state(feats)
    torch.testing.assert_close(dropped.h[~zero], kept.h[~zero])
    assert not (kept.h == 0).all(-1).any()
    # forward drops in train mode only
    tokens = _tokens(200, 1, 3)
    with torch.no_grad():
        train_logits, _ = model.train()(feats, tokens)
        eval_logits, _ = model.eval()(feats, tokens)
        again, _ = model(feats, tokens)
    torch.testing.assert_close(eval_logits, again)
    assert not torch.allclose(train_logits, eval_logits)


def test_masked_loss_ignores_pad_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, V, generator=gen)
    targets = torch.tensor(
        [[[5, 6, END_ID, PAD_ID], [7, END_ID, PAD_ID, PAD_ID]], [[8, 9, 10, END_ID], [4, 4, END_ID, PAD_ID]]]
    )
    loss = masked_loss(logits, targets)
    # the mean cross-entropy over the 11 real tokens, computed by hand
    logp = logits.log_softmax(-1)
    real = targets != PAD_ID
    expected = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[real].mean()
    torch.testing.assert_close(loss, expected)
    changed = logits.clone()
    changed[~real] = torch.randn(int((~real).sum()), V, generator=gen) * 10
    torch.testing.assert_close(masked_loss(changed, targets), loss, atol=0, rtol=0)
    changed[0, 0, 0, 5] += 5.0  # a real position does change it (its target word gets likelier)
    assert not torch.isclose(masked_loss(changed, targets), loss)


def test_training_loss_is_the_masked_loss_over_all_logits():
    """fit's loss applies the output layer to the non-<pad> steps only: the same value as masking."""
    model = _narrow_model(seed=2).eval()
    feats, tokens = _features(2, dim=NARROW_D), _tokens(2, 2, 7)
    tokens[0, 1, 3], tokens[0, 1, 4:] = END_ID, PAD_ID
    tokens[1, 0, 5], tokens[1, 0, 6:] = END_ID, PAD_ID
    total, loss = caption_loss(model, feats, tokens, 0.5)
    logits, alphas = model(feats, tokens[..., :-1])
    expected = masked_loss(logits, tokens[..., 1:])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(total, expected + 0.5 * attention_penalty(alphas, tokens[..., 1:]), atol=1e-6, rtol=0)


def test_attention_penalty_zero_when_each_cell_sums_to_one_over_time():
    targets = torch.tensor([[[5, 6, 7, END_ID, PAD_ID, PAD_ID]]])  # 4 real steps, 2 pads
    alphas = torch.rand(1, 1, 6, P)  # the pad steps hold anything
    alphas[..., :4, :] = 0.25  # every cell gets 1/4 at each of the 4 real steps: sums to 1 over time
    assert float(attention_penalty(alphas, targets)) == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((1, 1, 6, P), 1.0 / P)
    assert float(attention_penalty(uniform, targets)) == pytest.approx((1 - 4 / P) ** 2, rel=1e-5)
    # a doubly stochastic map over 49 real steps (each step attends to one cell, each cell once)
    perm = torch.eye(P)[torch.randperm(P)].reshape(1, 1, P, P)
    assert float(attention_penalty(perm, torch.full((1, 1, P), 5))) == pytest.approx(0.0, abs=1e-12)


# -- decoding -----------------------------------------------------------------------------------------


def _manual_greedy(model: Decoder, feats: torch.Tensor, max_steps: int) -> list[list[int]]:
    """Argmax step by step over the words a caption may contain (no <pad>/<start>, <unk> last resort)."""
    out = []
    with torch.no_grad():
        for i in range(feats.shape[0]):
            state = model.init_state(feats[i : i + 1])
            token, words = START_ID, []
            for _ in range(max_steps):
                logits, state, _ = model.step(state, torch.tensor([[token]]))
                allowed = logits[0, 0].clone()
                allowed[[PAD_ID, START_ID, UNK_ID]] = -float("inf")
                token = int(allowed.argmax())
                if token == END_ID:
                    break
                words.append(token)
            out.append(words)
    return out


def _sequence_logprob(model: Decoder, feats: torch.Tensor, words: list[int], ended: bool) -> float:
    """Length-normalised log-probability of `words` (and <end> when it ended), by teacher forcing."""
    seq = [START_ID, *words] + ([END_ID] if ended else [])
    with torch.no_grad():
        logits, _ = model(feats[None], torch.tensor([[seq[:-1]]]))
    logp = logits[0, 0].log_softmax(-1)
    total = sum(float(logp[t, seq[t + 1]]) for t in range(len(seq) - 1))
    return total / (len(seq) - 1)


@pytest.fixture(scope="module")
def end_biased_model() -> Decoder:
    """A random decoder with large weights (peaked, image-dependent distributions) and <end> made likely
    enough that captions end after a few words or run to max_steps: beams differ in length."""
    model = _narrow_model(seed=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
        model.fc_out.bias[END_ID] = 1.0
    return model


def test_greedy_is_the_argmax_path_and_beam1_equals_greedy(end_biased_model):
    feats = _features(4, seed=11, dim=NARROW_D)
    out = greedy(end_biased_model, feats, max_steps=12)
    assert [d.tokens for d in out] == _manual_greedy(end_biased_model, feats, 12)
    beam1 = beam_search(end_biased_model, feats, beam_size=1, max_steps=12)
    for a, b in zip(out, beam1, strict=True):
        assert a.tokens == b.tokens and a.score == b.score
        np.testing.assert_array_equal(a.attention, b.attention)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoded_score_is_length_normalised_logprob(end_biased_model, beam_size):
    feats = _features(4, seed=11, dim=NARROW_D)
    max_steps = 12
    out = beam_search(end_biased_model, feats, beam_size=beam_size, max_steps=max_steps)
    lengths = {len(d.tokens) for d in out}
    assert len(lengths) > 1 and min(lengths) < max_steps, "the case should mix lengths and ended captions"
    for i, d in enumerate(out):
        ended = len(d.tokens) < max_steps
        assert d.score == pytest.approx(_sequence_logprob(end_biased_model, feats[i], d.tokens, ended), abs=1e-4)
        assert d.attention.shape == (len(d.tokens), P)
        np.testing.assert_allclose(d.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_special_tokens_and_no_unk_when_another_word_is_possible(beam_size):
    model = _narrow_model(seed=5).eval()
    with torch.no_grad():
        model.fc_out.bias[UNK_ID] = 40.0  # <unk> is by far the most likely word at every step
        model.fc_out.bias[PAD_ID] = 30.0
        model.fc_out.bias[START_ID] = 30.0
        model.fc_out.bias[END_ID] = -5.0  # and captions run to max_steps words
    out = beam_search(model, _features(3, dim=NARROW_D), beam_size=beam_size, max_steps=8)
    for d in out:
        assert len(d.tokens) == 8
        assert not set(d.tokens) & {PAD_ID, START_ID, END_ID, UNK_ID}
        assert all(4 <= t < V for t in d.tokens)


class _State:
    def select(self, image_index, group_index):
        return self


class MarkovModel:
    """A fake decoder whose next-word distribution depends only on the previous word."""

    # ids: 0 pad, 1 start, 2 end, 3 unk, 4 "a", 5 "b", 6 "c", 7 "d"
    TABLE = {
        START_ID: {4: 0.5, 5: 0.4, 6: 0.05, 7: 0.05},
        4: {6: 0.3, 7: 0.28, END_ID: 0.2, 5: 0.22},  # "a" is locally best, but everything after it is weak
        5: {END_ID: 0.99, 6: 0.01},  # "b <end>" is far better overall
        6: {END_ID: 0.9, 7: 0.1},
        7: {END_ID: 0.9, 6: 0.1},
    }
    VOCAB = 8

    def __init__(self) -> None:
        table = torch.full((self.VOCAB, self.VOCAB), 1e-9)
        for prev, nxt in self.TABLE.items():
            for word, p in nxt.items():
                table[prev, word] = p
        self.logits = table.log()

    def init_state(self, features, groups: int = 1):
        self.groups = groups
        return _State()

    def step(self, state, tokens):
        b, g = tokens.shape
        return self.logits[tokens], state, torch.full((b, g, P), 1.0 / P)


def test_beam_search_finds_a_better_sequence_than_greedy():
    model, feats = MarkovModel(), torch.zeros(2, 7, 7, 2048)
    g = greedy(model, feats, max_steps=6)
    b = beam_search(model, feats, beam_size=3, max_steps=6)
    for dg, db in zip(g, b, strict=True):
        assert isinstance(dg, Decoded)
        assert dg.tokens == [4, 6]  # a c <end>
        assert dg.score == pytest.approx((math.log(0.5) + math.log(0.3) + math.log(0.9)) / 3, abs=1e-5)
        assert db.tokens == [5]  # b <end>
        assert db.score == pytest.approx((math.log(0.4) + math.log(0.99)) / 2, abs=1e-5)
        assert db.score > dg.score
        assert db.attention.shape == (1, P)
    assert model.groups == 3


def test_beam_search_without_end_keeps_the_best_unfinished_sequence():
    model = MarkovModel()
    model.logits[:, END_ID] = -1e9  # never ends: the best of max_steps words wins
    out = beam_search(model, torch.zeros(1, 7, 7, 2048), beam_size=3, max_steps=4)[0]
    assert len(out.tokens) == 4
    logp = model.logits.log_softmax(-1)
    seq = [START_ID, *out.tokens]
    assert out.score == pytest.approx(sum(float(logp[seq[t], seq[t + 1]]) for t in range(4)) / 4, abs=1e-5)
    assert END_ID not in out.tokens


def test_decode_rows_keeps_the_order_of_the_rows(end_biased_model):
    feats = _features(5, seed=17, dim=NARROW_D).numpy().astype(np.float16)
    rows = np.array([3, 0, 4, 1])
    out = decode_rows(end_biased_model, feats, rows, torch.device("cpu"), beam_size=2, max_steps=8, batch_size=3)
    direct = beam_search(end_biased_model, torch.from_numpy(feats[rows].astype(np.float32)), 2, 8)
    assert [d.tokens for d in out] == [d.tokens for d in direct]
    assert [d.score for d in out] == pytest.approx([d.score for d in direct], abs=1e-5)
    assert len({tuple(d.tokens) for d in out}) > 1, "all images decoded alike: the test cannot see a reordering"


def test_training_loss_and_gradients_unchanged_when_whole_images_end_early():
    """Images whose captions all end early drop out of the later steps (sorted prefix): the loss, the
    attention penalty and every gradient equal those of the full, masked computation."""
    model = _narrow_model(seed=5).eval()
    feats, tokens = _features(4, dim=NARROW_D), _tokens(4, 2, 9)
    ends = {0: (3, 5), 1: (8, 8), 2: (2, 2), 3: (6, 4)}  # per image, per caption: where <end> goes
    for b, per_caption in ends.items():
        for g, e in enumerate(per_caption):
            tokens[b, g, e], tokens[b, g, e + 1 :] = END_ID, PAD_ID
    total, _ = caption_loss(model, feats, tokens, 0.5)
    total.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, alphas = model(feats, tokens[..., :-1])
    expected = masked_loss(logits, tokens[..., 1:]) + 0.5 * attention_penalty(alphas, tokens[..., 1:])
    expected.backward()
    torch.testing.assert_close(total, expected, atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_train_step_with_amp_on_cpu_updates_the_model():
    """`fit --amp` on a CPU: bf16 autocast, a finite loss, and the weights move."""
    from pipeline.data import Batch
    from pipeline.loss import CaptionTraining
    from pipeline.train import TrainConfig, make_optimizer, train_step

    model = _narrow_model(seed=6)
    before = model.gates.weight.detach().clone()
    batch = Batch(_features(3, dim=NARROW_D).half(), _tokens(3, 1, 6), np.arange(3))
    loss = train_step(CaptionTraining(model), make_optimizer(model, 1e-3), batch, TrainConfig(amp=True))
    assert torch.isfinite(loss) and loss > 0
    assert not torch.equal(before, model.gates.weight)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
@pytest.mark.parametrize("n_best", [False, True], ids=["best", "n-best"])
def test_beam_search_stops_when_no_live_beam_can_change_the_result(beam_size, n_best, monkeypatch):
    """The search stops once no live hypothesis can still beat the best finished one (or, with the n-best list,
    enter it); a full search (no stop until every beam has ended or max_steps) must find the same captions,
    scores, attention and n-best lists, and the stop must save steps. The model: peaked distributions, <end>
    likely (as a trained captioner's after a sentence), so that the beams that go on soon have no chance left."""
    import pipeline.decode as decode

    model = _narrow_model(seed=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
        model.fc_out.bias[END_ID] = 3.0
    keep = beam_size if n_best else 0
    steps, found = {"stopped": 0, "full": 0}, {}
    stop = decode._settled
    for kind in ("stopped", "full"):
        if kind == "full":
            monkeypatch.setattr(decode, "_settled", lambda best, live, *rest: not bool(torch.isfinite(live).any()))
        found[kind] = []
        for seed in range(6):
            counted = _StepCounter(model)
            found[kind] += beam_search(counted, _features(3, seed=20 + seed, dim=NARROW_D), beam_size, 12, keep)
            steps[kind] += counted.steps
    assert decode._settled is not stop
    for a, b in zip(found["stopped"], found["full"], strict=True):
        assert a.tokens == b.tokens and a.score == b.score
        np.testing.assert_array_equal(a.attention, b.attention)
        assert [(h.tokens, h.score) for h in a.beams] == [(h.tokens, h.score) for h in b.beams]
    assert steps["stopped"] < steps["full"], steps


class _StepCounter:
    """The decoder, counting the steps a search runs."""

    def __init__(self, model: Decoder) -> None:
        self.model, self.steps = model, 0

    def init_state(self, *args, **kwargs):
        return self.model.init_state(*args, **kwargs)

    def step(self, *args, **kwargs):
        self.steps += 1
        return self.model.step(*args, **kwargs)


# -- n-best (serve shows the n best beams with their scores) -------------------------------------------


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_n_best_leaves_the_best_caption_unchanged(end_biased_model, beam_size):
    """Asking for the n-best list changes nothing in what generate and evaluate get."""
    feats = _features(4, seed=11, dim=NARROW_D)
    plain = beam_search(end_biased_model, feats, beam_size=beam_size, max_steps=12)
    with_n = beam_search(end_biased_model, feats, beam_size=beam_size, max_steps=12, n_best=beam_size)
    for a, b in zip(plain, with_n, strict=True):
        assert a.beams == []
        assert a.tokens == b.tokens and a.score == b.score
        np.testing.assert_array_equal(a.attention, b.attention)
        assert 1 <= len(b.beams) <= beam_size
        first = b.beams[0]
        assert first.tokens == b.tokens and first.score == b.score
        np.testing.assert_array_equal(first.attention, b.attention)


def test_n_best_are_distinct_sorted_and_scored_like_the_best(end_biased_model):
    feats, max_steps = _features(4, seed=11, dim=NARROW_D), 12
    out = beam_search(end_biased_model, feats, beam_size=4, max_steps=max_steps, n_best=4)
    assert any(len(d.beams) == 4 for d in out)
    for i, d in enumerate(out):
        scores = [h.score for h in d.beams]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in d.beams}) == len(d.beams)
        for h in d.beams:
            ended = len(h.tokens) < max_steps
            assert h.score == pytest.approx(_sequence_logprob(end_biased_model, feats[i], h.tokens, ended), abs=1e-4)
            assert h.attention.shape == (len(h.tokens), P)


def test_n_best_of_a_known_distribution():
    """MarkovModel: 'b <end>' (0.4 x 0.99), then 'a c <end>' (0.5 x 0.3 x 0.9), then 'a d <end>' (0.5 x 0.28 x 0.9)."""
    out = beam_search(MarkovModel(), torch.zeros(1, 7, 7, 2048), beam_size=3, max_steps=6, n_best=3)[0]
    assert [h.tokens for h in out.beams] == [[5], [4, 6], [4, 7]]
    expected = [math.log(0.4 * 0.99) / 2, math.log(0.5 * 0.3 * 0.9) / 3, math.log(0.5 * 0.28 * 0.9) / 3]
    assert [h.score for h in out.beams] == pytest.approx(expected, abs=1e-5)
    assert [h.attention.shape for h in out.beams] == [(1, P), (2, P), (2, P)]
    one = beam_search(MarkovModel(), torch.zeros(1, 7, 7, 2048), beam_size=1, max_steps=6, n_best=3)[0]
    assert [h.tokens for h in one.beams] == [one.tokens] == [[4, 6]]


def test_feature_statistics_never_amplify_a_channel_dead_in_training():
    """A ReLU channel that is 0 on every training image must not be blown up the day it is not (a new photo, or a
    layer4 being fine-tuned): its deviation is floored at a tenth of the median channel's."""
    from pipeline.data import STD_FLOOR, feature_stats

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((16, 7, 7, 64))).astype(np.float32) * 3.0
    feats[..., 5] = 0.0  # dead in training
    stats = feature_stats(feats, np.arange(16))
    typical = float(stats.std.median())
    assert float(stats.std[5]) == pytest.approx(STD_FLOOR * typical, rel=1e-5)
    assert float(stats.mean[5]) == 0.0
    np.testing.assert_allclose(stats.mean.numpy()[:5], feats[..., :5].reshape(-1, 5).mean(0), rtol=1e-5)


@pytest.mark.parametrize("norm", ["channel", "rms", "none"])
def test_grid_mean_is_each_cells_training_mean_in_the_space_the_decoder_reads(norm):
    """The state from the grid centres each cell with the train split's mean of that cell, in the space
    --feature-norm makes (channel, rms or raw): the mean training image enters it as zeros; one cell moves it."""
    from pipeline.data import feature_stats
    from pipeline.train import TrainConfig, build_model

    rng = np.random.default_rng(0)
    # each cell and channel its own scale, as a random ResNet50's positions differ (zero padding)
    feats = (np.abs(rng.standard_normal((12, 7, 7, 2048))) * rng.uniform(0.5, 30, (7, 7, 2048))).astype(np.float32)
    stats = feature_stats(feats, np.arange(12))
    np.testing.assert_allclose(stats.cell_mean.numpy(), feats.mean(0).reshape(49, 2048), rtol=1e-5)
    torch.manual_seed(0)
    cfg = TrainConfig(decoder="tiny", feature_norm=norm, init_from_grid=4)
    decoder = build_model(cfg, V, stats)
    mean_image = torch.from_numpy(feats.mean(0, keepdims=True))
    centred = decoder.normalise(mean_image) - decoder.grid_mean
    assert float(centred.abs().max()) < 1e-3 * float(decoder.normalise(mean_image).abs().max())
    moved = mean_image.clone()
    moved[0, 3, 3] += 1.0
    with torch.no_grad():
        assert not torch.allclose(decoder.init_state(moved).h, decoder.init_state(mean_image).h)
