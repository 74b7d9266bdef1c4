"""`fit`: train the decoder from the memory-mapped store, in one process or under torchrun; from a layer3 store,
optionally ResNet50's layer4 too.

The model is a `CaptionModel`: the decoder, with layer4 in front of it when the store holds layer3 features
(`--finetune layer4` trains it, with its own learning rate; otherwise it runs frozen, under no_grad). fit
trains it inside `loss.CaptionTraining`, the one module DDP wraps.

`fit` is the loop. What it is built from, by module:

- `recipe`: `fit`, `run_epochs` (the epochs), `Phases` (cross-entropy, then SCST), `train_epoch` (one pass);
- `setup`: `prepare` (store, vocabulary, encoded captions), `build_model`, `build_encoder`,
  `make_optimizer`/`make_scheduler`, `start` (a new run) or `resume_config`/`resume` (last.pt's), `fits_on_gpu`;
- `state`: `TrainingData`, `TrainingState`, `Best` (which epoch model.pt holds), `RESUMED_KEYS`;
- `run_folder`: `RunFiles` (OUT), claiming OUT, `save_epoch` (through pipeline/checkpoint.py), metrics.jsonl;
- `validation`: `validate` (loss, CIDEr-D, a sample caption) on the `validation_set`;
- `step`: `train_step`, one optimisation step (fit and the benchmarks);
- `TrainConfig` (pipeline/config.py) checks its own values: `TrainConfig.validate()`.

Under torchrun (pipeline/distributed.py) every rank runs the same loop on its share of each global batch
(`data.Batches`), with the training module wrapped in DistributedDataParallel; rank 0 alone looks at and
writes OUT, and validation is split across the ranks and gathered. In one process none of that exists: no
process group, no wrapper, the same arithmetic as before.
"""

from pipeline.config import TrainConfig
from pipeline.train.recipe import fit, train_epoch
from pipeline.train.setup import build_model, fits_on_gpu, make_optimizer, prepare
from pipeline.train.step import train_step

# what cli.py, the demo, the benchmarks and the tests use; the rest is imported from its module
__all__ = ["TrainConfig", "build_model", "fit", "fits_on_gpu", "make_optimizer", "prepare", "train_epoch", "train_step"]
