"""fit's training step in samples/s, for comparing two checkouts on the same machine (before/after a change).

    AB=$PWD/benchmarks/ab_step.py PY=$PWD/.venv/bin/python  # from this checkout's root, after `uv sync`
    git archive OLD | tar -x -C /tmp/ab/old;  git archive NEW | tar -x -C /tmp/ab/new
    (cd /tmp/ab/old && $PY -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \\
        from benchmarks.common import flickr, make_store; make_store(Path('/tmp/ab/store.h5'), flickr().train[:640])")
    for tree in old new new old old new; do (cd /tmp/ab/$tree && $PY $AB /tmp/ab/store.h5 10); done

Run from the root of the checkout being measured: it imports that checkout's `benchmarks.common.OurTraining`
(fit's own Batches, make_optimizer and train_step), at fit's default vocabulary (min count 5 on Flickr30k's
train split, 7,456 words), batch 32, one caption per image, on the CPU. Prints samples/s over STEPS timed
batches after 2 warm-up batches. Alternate the checkouts, and their order, over several rounds: on a shared
machine the speed drifts from minute to minute.
"""

from __future__ import annotations

import sys

sys.path.insert(0, ".")  # the checkout in the current directory, not the one this file is in

import torch  # noqa: E402

from benchmarks.common import OurTraining, measure, vocabulary  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402


def main(store_path: str, steps: int) -> float:
    store = FeatureStore(store_path)
    device = torch.device("cpu")
    training = OurTraining(store, vocabulary("ours"), 32, 1, device)
    try:
        return measure(training.step, device, warmup=2, min_steps=steps, max_steps=steps, budget_s=0).rate
    finally:
        training.close()


if __name__ == "__main__":
    print(f"{main(sys.argv[1], int(sys.argv[2])):.2f}")
