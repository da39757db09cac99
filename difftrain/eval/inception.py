"""The Inception-v3 network of the reference FID implementation, for 2048-d pool3 features.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is defined on the pool3 features of the TensorFlow Inception-v3 graph of 2015-12-05
(Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision"). Scores are only
comparable with published ones when exactly that network is used. pytorch-fid ported its weights to
PyTorch; the layout is torchvision's ``Inception3`` (1008 classes, no auxiliary head) with three
differences in the pooling branch of the mixed blocks, which match the TF graph:

* A, C and E blocks: the 3x3 average pool ignores the zero padding (``count_include_pad=False``);
* the last E block (``Mixed_7c``) max-pools instead of average-pooling.

The weight file
    ``pt_inception-2015-12-05-6726825d.pth`` from the pytorch-fid release
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
is not downloaded by difftrain: copy it onto the cluster yourself and pass its path
(``inception:/path/pt_inception-2015-12-05-6726825d.pth``), or put it in ``$DIFFTRAIN_INCEPTION``
(the file or its folder) or the cache folder. A ``.safetensors`` conversion with the same keys loads
too. pytorch-fid publishes no full checksum: ``6726825d`` in the name follows torch.hub's
``name-<sha256 prefix>`` convention, but pytorch-fid does not verify it, so neither do we. The
extractor's fingerprint is computed from the loaded weights.

State-dict keys are exactly those of pytorch-fid's ``fid_inception_v3()`` (torchvision's names:
``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.branch_pool.conv.weight``, ``fc.weight`` [1008, 2048]),
so the file loads with ``strict=True``. ``fc`` is kept only for that; features are the pool3 output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FILE_NAME}"
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)
SIZE = 299

# The order in which torchvision's Inception3 applies its children up to pool3.
_POOL3_PATH = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
               "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 'SAME' average pool: padded zeros do not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(tv.InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionE(tv.InceptionE):
    """``pool="avg"`` (Mixed_7b, TF-style average) or ``pool="max"`` (Mixed_7c in the FID graph)."""

    def __init__(self, in_channels: int, pool: str = "avg", conv_block=None):
        super().__init__(in_channels, conv_block)
        self.pool = {"avg": _tf_avg_pool, "max": _max_pool}[pool]

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return [self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))]


class FIDInceptionV3(tv.Inception3):
    """torchvision's Inception3 with the FID graph's blocks; :meth:`pool3` gives the FID features.

    Input: float [N, 3, 299, 299] in [-1, 1]. Built with PyTorch's default init (the weights are
    meant to be loaded); parameters and buffers are exactly pytorch-fid's.
    """

    def __init__(self):
        blocks = [tv.BasicConv2d, FIDInceptionA, tv.InceptionB, FIDInceptionC, tv.InceptionD, FIDInceptionE,
                  tv.InceptionAux]
        super().__init__(num_classes=NUM_CLASSES, aux_logits=False, transform_input=False,
                         inception_blocks=blocks, init_weights=False)
        self.Mixed_7c = FIDInceptionE(2048, pool="max")

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        for name in _POOL3_PATH:
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def load_weights(self, state_dict: dict) -> None:
        """``load_state_dict(strict=True)``; a file without BatchNorm ``num_batches_tracked`` counters
        (unused in eval) gets zeros for them."""
        state_dict = dict(state_dict)
        for k, v in self.state_dict().items():
            if k.endswith("num_batches_tracked") and k not in state_dict:
                state_dict[k] = torch.zeros_like(v)
        self.load_state_dict(state_dict, strict=True)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] (C = 1 or 3) -> float [N, 3, 299, 299] in [-1, 1], as pytorch-fid: scale to
    [0, 1], bilinear resize (``align_corners=False``, no antialias), then ``2x - 1``."""
    x = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)  # as PIL's convert('RGB') in pytorch-fid's loader
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0
