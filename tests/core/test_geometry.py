"""Where the encoder's 7x7 cells are on the picture: the attention figures (figures.heat_map, serve's page) and
the demo's attention measure (demo.object_mask) put cell (i, j) where ResNet50 centres it, on pixel (j, i) x 32 of
the 224x224 input, half a cell up and left of the picture's own 7x7 tiling."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.demo import object_mask
from pipeline.encoder import build_encoder
from pipeline.figures import heat_map


def test_resnet50s_middle_cell_is_centred_on_pixel_96_not_on_the_tilings_112():
    """The input gradient of the middle cell's features: its centre of mass is at the strided convolutions'
    centre (3 x 32 = 96), not at the middle of the picture's middle tile (111.5)."""
    torch.manual_seed(0)
    trunk, _ = build_encoder("none")
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    (grad,) = torch.autograd.grad(trunk.eval()(x)[0, :, 3, 3].abs().sum(), x)
    weight = grad.abs()[0].sum(0)  # (224, 224)
    pixels = torch.arange(224, dtype=torch.float64)
    rows, cols = weight.sum(1).double(), weight.sum(0).double()
    centre = [float((w * pixels).sum() / w.sum()) for w in (rows, cols)]
    for c in centre:
        assert abs(c - 96) < 5 and abs(c - 96) < abs(c - 111.5), centre


def test_heat_map_puts_each_cell_on_its_centre():
    for i, j in ((3, 3), (0, 0), (2, 5)):
        alpha = np.zeros(49)
        alpha[i * 7 + j] = 1.0
        heat = heat_map(alpha).astype(int)
        assert heat.shape == (224, 224) and heat[32 * i, 32 * j] == 255
        assert np.unravel_index(heat.argmax(), heat.shape) == (32 * i, 32 * j)
        if i == j == 3:  # symmetric about its centre: 16 px either side read the same
            assert heat[96 - 16, 96] == heat[96 + 16, 96] == heat[96, 96 - 16] == heat[96, 96 + 16]


def test_object_mask_counts_cover_in_the_encoders_cells():
    """A circle centred on cell (3, 3)'s centre (96, 96) covers cells 2 and 4 alike; on the picture's tiling it
    straddled tiles 2 and 3."""
    attrs = {"shape": "circle", "object": {"cx": 96.0, "cy": 96.0, "r": 20.0}}
    mask = object_mask(attrs, 224).reshape(7, 7)
    assert np.unravel_index(mask.argmax(), mask.shape) == (3, 3) and mask[3, 3] > 0.8
    assert abs(mask[2, 3] - mask[4, 3]) < 0.04 and abs(mask[3, 2] - mask[3, 4]) < 0.04  # Pillow: +-1 px
    assert mask[2, 3] > 0
