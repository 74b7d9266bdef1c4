"""A linear probe: what a linear classifier reads from stored features, the ceiling a captioner is held to.

If a logistic regression on the same features names an image's colour, shape or place, the information is
in the features, and a captioner that does not name it has failed to learn it (the decoder, its inputs or its
training), not the encoder. The demo prints the probe's accuracy next to the captions' accuracy, and
`benchmarks/bench_probe.py` runs it on any store with attribute labels.

The classifier: multinomial logistic regression with an L2 penalty on each feature standardised with the
train split's mean and standard deviation; on the whole grid (7x7x2048 values), on its mean over the grid
cells (2048), or on one weighted mean of the cells per image ("glimpse", 2048: given weights, such as the share
of each cell an object covers, which is what one attention step can read). Fitted on the train rows with
L-BFGS (torch's), the penalty chosen from a short list by accuracy on the val rows, then scored on the test
rows.

With far fewer images than feature values (the demo: 384 x 100,352), the fit runs in the dual: an L2-penalised
linear model's weights lie in the span of the training rows, w = X^T a, so the logits are K a with the
(n x n) kernel K = X X^T, and the penalty |w|^2 is a^T K a. The same classifier, fitted over n x classes
numbers instead of D x classes (seconds instead of minutes). Written with torch rather than scikit-learn:
torch is already a dependency, and the fit is a dozen lines; scikit-learn would add ~40 MB for one classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PENALTIES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 weight on the mean cross-entropy, tried in turn; chosen on val
POOLS = ("grid", "mean")  # and "glimpse", with weights


@dataclass(frozen=True)
class ProbeResult:
    attribute: str
    pool: str  # grid: every cell's features; mean: their mean over the cells; glimpse: a weighted mean
    accuracy: float  # on the test rows
    val_accuracy: float  # of the chosen penalty, on the val rows
    penalty: float
    chance: float  # 1 / number of classes

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _inputs(features: np.ndarray, rows: np.ndarray, pool: str, weights: np.ndarray | None) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(features[np.sort(rows)], dtype=np.float32))  # (n, h, w, C)
    order = np.argsort(np.argsort(rows))  # back to the order of `rows`
    x = x[torch.from_numpy(order)]
    if pool == "glimpse":
        w = torch.from_numpy(np.asarray(weights, dtype=np.float32)[rows])  # (n, h * w)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.einsum("np,npc->nc", w, x.reshape(len(rows), w.shape[1], -1))
    return x.mean(dim=(1, 2)) if pool == "mean" else x.reshape(len(rows), -1)


def _fit(k: torch.Tensor, y: torch.Tensor, classes: int, penalty: float, steps: int = 200) -> torch.Tensor:
    """Dual weights (n + 1, classes) of a logistic regression on the train kernel k (n, n), bias last (not
    penalised): logits = k a + b, penalty a^T k a (= |w|^2 for w = X^T a)."""
    a = torch.zeros(k.shape[0] + 1, classes, dtype=k.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ka = k @ a[:-1]
        loss = F.cross_entropy(ka + a[-1], y) + penalty * (a[:-1] * ka).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return a.detach()


def _accuracy(a: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> float:
    """k: (m, n) kernel of m rows against the n train rows."""
    return float(((k @ a[:-1] + a[-1]).argmax(1) == y).float().mean()) if len(y) else float("nan")


def linear_probe(
    features: np.ndarray,
    labels: dict[str, list[str]],
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    test_rows: np.ndarray,
    pools: tuple[str, ...] = POOLS,
    weights: np.ndarray | None = None,
) -> list[ProbeResult]:
    """For each attribute in `labels` (attribute -> one label per store row) and each pool, the test accuracy of
    a linear classifier fitted on the train rows' features. `features`: (N, h, w, C), a memory map is fine;
    `weights` (N, h * w): each row's cell weights, for the pool "glimpse"."""
    if "glimpse" in pools and weights is None:
        raise ValueError("the glimpse pool needs each row's cell weights")
    results = []
    with torch.no_grad():
        pooled = {
            pool: [_inputs(features, r, pool, weights) for r in (train_rows, val_rows, test_rows)] for pool in pools
        }
    for pool, (x_train, x_val, x_test) in pooled.items():
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
        # float64 kernels: the LBFGS fit on them is then deterministic and well-conditioned
        basis = x_train.double().T / x_train.shape[1]
        k_train, k_val, k_test = (x.double() @ basis for x in (x_train, x_val, x_test))
        for attribute, per_row in labels.items():
            names = sorted({per_row[r] for r in train_rows})
            index = {name: i for i, name in enumerate(names)}

            def targets(rows: np.ndarray, index: dict = index, per_row: list[str] = per_row) -> torch.Tensor:
                return torch.tensor([index.get(per_row[r], -1) for r in rows], dtype=torch.long)

            y_train, y_val, y_test = targets(train_rows), targets(val_rows), targets(test_rows)
            best = None
            for penalty in PENALTIES:
                w = _fit(k_train, y_train, len(names), penalty)
                val = _accuracy(w, k_val, y_val) if len(val_rows) else _accuracy(w, k_train, y_train)
                if best is None or val > best[0]:
                    best = (val, penalty, w)
            val, penalty, w = best
            results.append(
                ProbeResult(attribute, pool, _accuracy(w, k_test, y_test), val, penalty, 1 / max(len(names), 1))
            )
    return results
