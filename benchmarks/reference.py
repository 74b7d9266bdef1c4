"""The report's end-to-end training loop, reimplemented faithfully so that its cost can be measured here.

Per batch of 32 images, everything the report did on every step:
- decode each JPEG with Pillow, Resize((224, 224)), ToTensor, Normalize (ImageNet), in the training process;
- run the frozen torchvision ResNet50 trunk (children[:-2], eval, no_grad): (B, 2048, 7, 7) -> (B, 49, 2048);
- the report's decoder: Embedding(V, 300); per time step the attention recomputes f_att(features)
  (Linear 2048 -> 256) and adds h_att(h) (Linear 512 -> 256), fc (Linear 256 -> 1), softmax over the 49
  cells; LSTMWithAttention with four separate Linear(2860 -> 512) Wi, Wf, Wc, Wo on cat[emb, h, context];
  h0 = c0 = 0; the output Linear(512 -> V) applied at each step;
- captions padded or cut to 20 tokens (index 0 pads and starts them), the model reads 19 and predicts 19;
  CrossEntropyLoss (ignore_index=0: the report had no pad masking, which does not change the cost);
  Adam lr 1e-3 on the decoder; float32 throughout (no autocast).
The report's StepLR (step 100, never fires in 50 epochs) and its loss print every 10 steps cost nothing and are
left out. Not used by the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import sync

SEQ_LEN = 20  # tokens per padded caption: the model reads 19 and predicts 19


class ReportAttention(nn.Module):
    def __init__(self, feature_dim: int = 2048, hidden_dim: int = 512, attention_dim: int = 256) -> None:
        super().__init__()
        self.f_att = nn.Linear(feature_dim, attention_dim)
        self.h_att = nn.Linear(hidden_dim, attention_dim)
        self.fc = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, 49, 2048), h (B, 512) -> context (B, 2048), alpha (B, 49)."""
        scores = self.fc(torch.tanh(self.f_att(features) + self.h_att(h).unsqueeze(1))).squeeze(2)  # (B, 49)
        alpha = F.softmax(scores, dim=1)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (B, 2048)
        return context, alpha


class LSTMWithAttention(nn.Module):
    def __init__(self, embed_dim: int = 300, hidden_dim: int = 512, feature_dim: int = 2048) -> None:
        super().__init__()
        size = embed_dim + hidden_dim + feature_dim  # 2860
        self.Wi = nn.Linear(size, hidden_dim)
        self.Wf = nn.Linear(size, hidden_dim)
        self.Wc = nn.Linear(size, hidden_dim)
        self.Wo = nn.Linear(size, hidden_dim)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([x, h, context], dim=1)  # (B, 2860)
        i = torch.sigmoid(self.Wi(z))
        f = torch.sigmoid(self.Wf(z))
        g = torch.tanh(self.Wc(z))
        o = torch.sigmoid(self.Wo(z))
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c


class ReportDecoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int = 300, hidden_dim: int = 512, feature_dim: int = 2048) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = ReportAttention(feature_dim, hidden_dim)
        self.lstm = LSTMWithAttention(embed_dim, hidden_dim, feature_dim)
        self.fc = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """features (B, 49, 2048), captions (B, 19) -> logits (B, 19, V)."""
        b, steps = captions.shape
        h = features.new_zeros(b, self.hidden_dim)
        c = features.new_zeros(b, self.hidden_dim)
        embedded = self.embedding(captions)  # (B, 19, 300)
        outputs = []
        for t in range(steps):
            context, _ = self.attention(features, h)  # f_att(features) recomputed at every step
            h, c = self.lstm(embedded[:, t], h, c, context)
            outputs.append(self.fc(h))
        return torch.stack(outputs, dim=1)


def report_encoder(seed: int = 0) -> nn.Module:
    """torchvision ResNet50 (weights=None, seeded), children[:-2], frozen, eval."""
    from torchvision.models import resnet50

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet50(weights=None)
    trunk = nn.Sequential(*list(model.children())[:-2])
    for p in trunk.parameters():
        p.requires_grad = False
    return trunk.eval()


def report_transform():  # -> torchvision.transforms.Compose
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


def report_encode(text: str, stoi: dict[str, int], length: int = SEQ_LEN) -> list[int]:
    """The report's layout: index 0 first (it starts every sequence), the words, padded or cut to 20."""
    from pipeline.vocab import tokenize

    ids = [0] + [stoi.get(w, 0) for w in tokenize(text)]
    return ids[:length] + [0] * (length - len(ids))


class ReferenceLoop:
    """One training step of the report per `step()` call; cycles over the given JPEGs and captions."""

    def __init__(
        self,
        images: Sequence[Path],
        captions: Sequence[Sequence[str]],
        stoi: dict[str, int],
        vocab_size: int,
        device: torch.device,
        batch_size: int = 32,
        encoder: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        self.images, self.device, self.batch_size, self.vocab_size = list(images), device, batch_size, vocab_size
        self.captions = [[report_encode(c, stoi) for c in caps] for caps in captions]
        self.transform = report_transform()
        self.encoder = (encoder if encoder is not None else report_encoder(seed)).to(device)
        torch.manual_seed(seed)
        self.decoder = ReportDecoder(vocab_size).to(device)
        self.criterion = nn.CrossEntropyLoss(ignore_index=0)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=1e-3)
        self.rng = np.random.default_rng(seed)
        self.cursor = 0
        self.breakdown: list[tuple[float, float, float]] = []  # per step: decode, encoder, decoder seconds

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.images[i % len(self.images)]) as img:
            return self.transform(img.convert("RGB"))

    def step(self) -> int:
        t0 = time.perf_counter()
        index = range(self.cursor, self.cursor + self.batch_size)
        self.cursor += self.batch_size
        pixels = torch.stack([self._load(i) for i in index]).to(self.device)  # (B, 3, 224, 224)
        rows = [self.captions[i % len(self.captions)] for i in index]
        tokens = torch.tensor([caps[self.rng.integers(len(caps))] for caps in rows], device=self.device)  # (B, 20)
        sync(self.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            feats = self.encoder(pixels)  # (B, 2048, 7, 7)
        feats = feats.view(feats.shape[0], feats.shape[1], -1).permute(0, 2, 1)  # (B, 49, 2048)
        sync(self.device)
        t2 = time.perf_counter()
        self.decoder.train()
        logits = self.decoder(feats, tokens[:, :-1])  # (B, 19, V)
        loss = self.criterion(logits.reshape(-1, self.vocab_size), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        sync(self.device)
        t3 = time.perf_counter()
        self.breakdown.append((t1 - t0, t2 - t1, t3 - t2))
        return self.batch_size
