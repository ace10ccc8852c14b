"""TrivialAugmentWide, RandAugment, AutoAugment (ImageNet policy) and random erasing, batched and keyed.

The choices (which op, which magnitude bin, its sign, AutoAugment's sub-policy and coins, the
erasing box) are drawn on the host per sample key from the counter-based hash of augment.py, for
a whole epoch's keys at once (numpy, vectorized); the device only gathers them. The ops run on a
float batch holding uint8 values (0..255 integers) and mirror torchvision.transforms.v2.functional
on uint8 tensors, op for op, including where it truncates and where it rounds:

- on an accelerator, ONE pass per op kind over the whole batch, with per-sample parameters chosen
  so that a sample that did not draw the op is left bit-identical (blend factor 1, posterize 8
  bits, solarize threshold 256, the identity matrix): no subset gathers, nothing that makes the
  host wait for the device (no nonzero/masked_select on data-dependent shapes);
- on the CPU, where the host knows every id at once, each sample that drew an op gets that op
  alone, in place on its own view of the batch (no row gathers or scatters, nothing for the
  Identity samples): 2.7x the throughput of running each op kind on a gathered subset;
- geometry (shear, translate, rotate) is ONE grid_sample with a per-sample inverse affine matrix,
  computed exactly as torchvision's `_get_inverse_affine_matrix` + `_affine_grid`, fill 0;
- equalize builds per-(sample, channel) 256-bin histograms with one scatter_add and PIL's LUT.

Documented difference: none in the arithmetic; with `interpolation=nearest`, a sampling position
that falls within float rounding of a pixel boundary may pick the other neighbour (batched bmm vs
torchvision's single-image bmm), so the geometric ops are compared pixel-wise with a tiny
tolerance on the fraction of differing pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from distcls.data.transforms.keys import Stream

# One id per op, shared by every policy.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")

POLICY_STREAM, ERASE_STREAM = Stream.POLICY, Stream.ERASE  # their blocks in keys.Stream
ERASE_TRIES = 10  # as torchvision's RandomErasing

Space = dict  # op name -> (magnitudes(num_bins, height, width) -> list of floats or None, signed)


def _lin(lo, hi):
    return lambda n, h, w: torch.linspace(lo, hi, n).tolist()


def _posterize(span):
    return lambda n, h, w: (8 - (torch.arange(n) / ((n - 1) / span))).round().int().tolist()


def _none(n, h, w):
    return None


# torchvision.transforms.v2._auto_augment's spaces, value for value (linspace in float32 as there).
TRIVIAL_WIDE: Space = {
    "Identity": (_none, False), "ShearX": (_lin(0.0, 0.99), True), "ShearY": (_lin(0.0, 0.99), True),
    "TranslateX": (_lin(0.0, 32.0), True), "TranslateY": (_lin(0.0, 32.0), True), "Rotate": (_lin(0.0, 135.0), True),
    "Brightness": (_lin(0.0, 0.99), True), "Color": (_lin(0.0, 0.99), True), "Contrast": (_lin(0.0, 0.99), True),
    "Sharpness": (_lin(0.0, 0.99), True), "Posterize": (_posterize(6), False), "Solarize": (_lin(1.0, 0.0), False),
    "AutoContrast": (_none, False), "Equalize": (_none, False),
}
RAND_AUGMENT: Space = {
    "Identity": (_none, False), "ShearX": (_lin(0.0, 0.3), True), "ShearY": (_lin(0.0, 0.3), True),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n).tolist(), True),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n).tolist(), True),
    "Rotate": (_lin(0.0, 30.0), True), "Brightness": (_lin(0.0, 0.9), True), "Color": (_lin(0.0, 0.9), True),
    "Contrast": (_lin(0.0, 0.9), True), "Sharpness": (_lin(0.0, 0.9), True), "Posterize": (_posterize(4), False),
    "Solarize": (_lin(1.0, 0.0), False), "AutoContrast": (_none, False), "Equalize": (_none, False),
}
AUTO_AUGMENT: Space = {**{k: v for k, v in RAND_AUGMENT.items() if k != "Identity"}, "Invert": (_none, False)}
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


# --------------------------------------------------------------------------- keyed choices (host)


@dataclass(frozen=True)
class PolicySpec:
    """Which policy and its parameters (from data.augment), and the image size the ops see."""
    name: str  # trivialaugment | randaugment | autoaugment
    num_ops: int = 2
    magnitude: int = 9
    num_bins: int = 31
    height: int = 224
    width: int = 224

    @property
    def layers(self) -> int:
        return {"trivialaugment": 1, "randaugment": self.num_ops, "autoaugment": 2}[self.name]

    def draw(self, uniform: Callable[[int], np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(op ids int64 [N, layers], signed magnitudes float64 [N, layers]) from `uniform(stream)`
        (the keyed uniforms of every key for one stream)."""
        if self.name == "autoaugment":
            return self._draw_auto(uniform)
        space = TRIVIAL_WIDE if self.name == "trivialaugment" else RAND_AUGMENT
        names = list(space)
        ids = np.array([OP_ID[n] for n in names])
        table, signed = _magnitude_table(space, names, self.num_bins, self.height, self.width)
        ops, mags = [], []
        for layer in range(self.layers):
            u_op, u_bin, u_sign = (uniform(POLICY_STREAM + 3 * layer + j) for j in range(3))
            pick = np.minimum((u_op * len(names)).astype(np.int64), len(names) - 1)
            if self.name == "trivialaugment":
                bins = np.minimum((u_bin * self.num_bins).astype(np.int64), self.num_bins - 1)
            else:
                bins = np.full_like(pick, self.magnitude)
            mag = table[pick, bins]
            mag = np.where(signed[pick] & (u_sign <= 0.5), -mag, mag)
            ops.append(ids[pick])
            mags.append(mag)
        return torch.from_numpy(np.stack(ops, 1)), torch.from_numpy(np.stack(mags, 1))

    def _draw_auto(self, uniform):
        names = list(AUTO_AUGMENT)
        table, signed = _magnitude_table(AUTO_AUGMENT, names, 10, self.height, self.width)
        sub_ops = np.array([[OP_ID[op] for op, _, _ in sub] for sub in IMAGENET_POLICY])
        sub_prob = np.array([[p for _, p, _ in sub] for sub in IMAGENET_POLICY])
        sub_mag = np.array(
            [[0.0 if m is None else table[names.index(op), m] for op, _, m in sub] for sub in IMAGENET_POLICY]
        )
        sub_signed = np.array([[bool(signed[names.index(op)]) for op, _, _ in sub] for sub in IMAGENET_POLICY])
        u_sub = uniform(POLICY_STREAM)
        sub = np.minimum((u_sub * len(IMAGENET_POLICY)).astype(np.int64), len(IMAGENET_POLICY) - 1)
        ops, mags = [], []
        for layer in range(2):
            u_apply, u_sign = uniform(POLICY_STREAM + 1 + 2 * layer), uniform(POLICY_STREAM + 2 + 2 * layer)
            apply = u_apply <= sub_prob[sub, layer]
            mag = sub_mag[sub, layer]
            mag = np.where(sub_signed[sub, layer] & (u_sign <= 0.5), -mag, mag)
            ops.append(np.where(apply, sub_ops[sub, layer], OP_ID["Identity"]))
            mags.append(np.where(apply, mag, 0.0))
        return torch.from_numpy(np.stack(ops, 1)), torch.from_numpy(np.stack(mags, 1))


def _magnitude_table(space: Space, names: list, num_bins: int, height: int, width: int):
    table = np.zeros((len(names), num_bins), dtype=np.float64)
    signed = np.zeros(len(names), dtype=bool)
    for i, name in enumerate(names):
        fn, sgn = space[name]
        values = fn(num_bins, height, width)
        if values is not None:
            table[i] = np.asarray(values, dtype=np.float64)
        signed[i] = sgn
    return table, signed


def erase_boxes(
    uniform: Callable[[int], np.ndarray], prob: float, scale, ratio, height: int, width: int
) -> torch.Tensor:
    """torchvision RandomErasing.make_params per key, vectorized: int64 [N, 4] (top, left, h, w);
    h = w = 0 where nothing is erased (the coin, or 10 tries without a fitting box).
    `uniform(stream, rows)`: the keyed uniforms of the keys at `rows` (None: every key); each try
    hashes only the keys still undecided (most are decided by the coin or the first try)."""
    coin = uniform(ERASE_STREAM, None)
    n = len(coin)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = np.zeros((n, 4), dtype=np.int64)
    pending = np.nonzero(coin < prob)[0]  # the keys to erase, until a box fits
    for t in range(ERASE_TRIES):
        if len(pending) == 0:
            break
        u = [uniform(ERASE_STREAM + 1 + 4 * t + j, pending) for j in range(4)]
        erase_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        h = np.round(np.sqrt(erase_area * aspect)).astype(np.int64)  # numpy rounds half to even, as Python's round
        w = np.round(np.sqrt(erase_area / aspect)).astype(np.int64)
        fits = (h < height) & (w < width)
        top = np.minimum((u[2] * (height - h + 1)).astype(np.int64), height - h)
        left = np.minimum((u[3] * (width - w + 1)).astype(np.int64), width - w)
        box[pending[fits]] = np.stack([top, left, h, w], 1)[fits]
        pending = pending[~fits]
    return torch.from_numpy(box)


# --------------------------------------------------------------------------- batched ops (device)


def apply_policy(x: torch.Tensor, ops: torch.Tensor, mags: torch.Tensor, interpolation: str = "bilinear",
                 on_grid: bool = False) -> torch.Tensor:
    """x: float [B, C, H, W] with values in 0..255 (rounded here to the uint8 grid first unless
    `on_grid`: they are uint8 values already); ops int64 [B, L], mags float64 [B, L] (on x's
    device). Layer by layer, each sample gets its op."""
    if not on_grid:
        x = x.round().clamp_(0, 255)
    for layer in range(ops.shape[1]):
        x = apply_ops(x, ops[:, layer], mags[:, layer], interpolation)
    return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor, interpolation: str = "bilinear",
              grouped: Optional[bool] = None) -> torch.Tensor:
    """One op per sample (ids in OPS, signed magnitude as torchvision's policies pass it); may
    write into x (the caller's own copy).

    On the CPU each sample that drew an op gets it on its own view of x, in place (the host knows
    the ids at once; no gathers or scatters of rows, Identity samples untouched). On an
    accelerator every kind runs over the whole batch with identity parameters for the others, so
    that nothing waits for the device to say which samples drew what. Both give each sample the
    same result whatever its batch holds. `grouped` (None: by the device) picks the way, for tests."""
    if x.device.type == "cpu" if grouped is None else grouped:
        return _apply_each(x, op, mag, interpolation)
    x = _geometric(x, op, mag, interpolation)
    x = _blend(x, op, mag)
    x = _posterize_solarize(x, op, mag)
    x = torch.where((op == OP_ID["AutoContrast"]).view(-1, 1, 1, 1), autocontrast(x), x)
    x = torch.where((op == OP_ID["Equalize"]).view(-1, 1, 1, 1), equalize(x), x)
    return x


def _apply_each(x, op, mag, interpolation):
    """In place, sample by sample on views x[i:i+1]: the geometric ops' matrices computed for all
    their samples at once, every other op's arithmetic exactly as the batched functions do it."""
    _, c, h, w = x.shape
    ids = op.tolist()
    geometric = [i for i, o in enumerate(ids) if OPS[o] in GEOMETRIC]
    if geometric:
        rows = torch.tensor(geometric, device=op.device)
        theta = _inverse_affine_of(op.index_select(0, rows), mag.index_select(0, rows), h, w).to(x.dtype)
        matrices = dict(zip(geometric, theta.split(1)))
    ratio = (1.0 + mag).to(x.dtype)  # the blends' factors, as _blend computes them
    for i, o in enumerate(ids):
        name, v = OPS[o], x[i:i + 1]
        if name == "Identity" or name == "Color" and c == 1 or name == "Sharpness" and min(h, w) <= 2:
            continue  # adjust_saturation leaves 1-channel images alone, adjust_sharpness those without inner pixels
        if name in GEOMETRIC:
            v.copy_(_warp(v, matrices[i], interpolation))
        elif name in BLENDS:
            r = ratio[i]
            blend = _DEGENERATE[name](v) * (1.0 - r)  # before v changes (Sharpness's degenerate of a tiny image is v)
            v.mul_(r).add_(blend).clamp_(0, 255).floor_()
        elif name == "Posterize":
            step = torch.pow(2.0, 8.0 - mag[i]).to(x.dtype)
            v.div_(step).floor_().mul_(step)
        elif name == "Solarize":
            threshold = torch.ceil(255.0 * mag[i].to(torch.float64)).to(x.dtype)
            v.copy_(torch.where(v >= threshold, 255.0 - v, v))
        elif name == "Invert":
            v.copy_(255.0 - v)
        elif name == "AutoContrast":
            v.copy_(autocontrast(v))
        else:
            v.copy_(equalize(v))
    return x


_DEGENERATE = {
    "Brightness": lambda x: torch.zeros((), dtype=x.dtype, device=x.device),
    "Color": lambda x: _gray_floor(x),
    "Contrast": lambda x: _gray_floor(x).mean(dim=(1, 2, 3), keepdim=True),
    "Sharpness": lambda x: _sharpness_degenerate(x),
}


def _is(op: torch.Tensor, *names) -> torch.Tensor:
    out = torch.zeros_like(op, dtype=torch.bool)
    for n in names:
        out |= op == OP_ID[n]
    return out


def inverse_affine(angle_deg, translate_x, translate_y, shear_x_deg, shear_y_deg, center_x, center_y) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix (scale 1), batched in float64: [B, 2, 3]."""
    rot, sx, sy = torch.deg2rad(angle_deg), torch.deg2rad(shear_x_deg), torch.deg2rad(shear_y_deg)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-center_x - translate_x) + m1 * (-center_y - translate_y) + center_x
    m5 = m3 * (-center_x - translate_x) + m4 * (-center_y - translate_y) + center_y
    return torch.stack([torch.stack([m0, m1, m2], -1), torch.stack([m3, m4, m5], -1)], 1)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's _affine_grid (pixel-centred coordinates, normalized after theta), batched."""
    dtype, device = theta.dtype, theta.device
    base = torch.empty(1, height, width, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device))
    base[..., 1].copy_(
        torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device).unsqueeze_(-1)
    )
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    return base.view(1, height * width, 3).expand(theta.shape[0], -1, -1).bmm(scaled).view(-1, height, width, 2)


def _inverse_affine_of(op, mag, height: int, width: int) -> torch.Tensor:
    """Each sample's inverse affine matrix [B, 2, 3] (float64) for its op (the identity for a
    non-geometric one), with the arguments torchvision's policies pass to affine/rotate."""
    m = mag.to(torch.float64)
    zero = torch.zeros_like(m)
    shear = torch.rad2deg(torch.atan(m))
    is_sx, is_sy = op == OP_ID["ShearX"], op == OP_ID["ShearY"]
    is_shear = is_sx | is_sy
    trunc = torch.trunc(m)  # torchvision passes translate=[int(magnitude), 0]
    return inverse_affine(
        angle_deg=torch.where(op == OP_ID["Rotate"], -m, zero),  # F.rotate(angle) = affine's -angle
        translate_x=torch.where(op == OP_ID["TranslateX"], trunc, zero),
        translate_y=torch.where(op == OP_ID["TranslateY"], trunc, zero),
        shear_x_deg=torch.where(is_sx, shear, zero),
        shear_y_deg=torch.where(is_sy, shear, zero),
        center_x=torch.where(is_shear, zero - 0.5 * width, zero),
        center_y=torch.where(is_shear, zero - 0.5 * height, zero),
    )


def _warp(x, theta, interpolation):
    """x resampled through `theta` (in x's dtype), fill 0, rounded to the uint8 grid."""
    _, _, h, w = x.shape
    grid = affine_grid(theta, h, w)
    moved = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False).round_()
    if interpolation == "bicubic":  # its kernel overshoots: back to the uint8 range, as a PIL image's bicubic affine is
        moved.clamp_(0, 255)
    return moved


def _geometric(x, op, mag, interpolation):
    _, _, h, w = x.shape
    moved = _warp(x, _inverse_affine_of(op, mag, h, w).to(x.dtype), interpolation)
    return torch.where(_is(op, *GEOMETRIC).view(-1, 1, 1, 1), moved, x)


def _gray_floor(x):
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _sharpness_degenerate(x):
    """3x3 smoothing (1,1,1;1,5,1;1,1,1)/13, rounded, borders kept: torchvision's adjust_sharpness."""
    c, h, w = x.shape[1:]
    if h <= 2 or w <= 2:
        return x
    # (sum of the 3x3 neighbourhood + 4 x centre) / 13 by shifted adds: a depthwise conv is slow on CPUs
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).round_()
    return out


def _blend(x, op, mag):
    """Brightness, Color (saturation), Contrast, Sharpness: x * r + degenerate * (1 - r), clamped and
    truncated like torchvision's uint8 _blend; r = 1 (exactly x) for every other sample."""
    is_blend = _is(op, *BLENDS)
    if x.shape[1] == 1:  # adjust_saturation leaves 1-channel images alone
        is_blend &= op != OP_ID["Color"]
    if min(x.shape[-2:]) <= 2:  # adjust_sharpness leaves images without inner pixels alone
        is_blend &= op != OP_ID["Sharpness"]
    ratio = torch.where(is_blend, 1.0 + mag, torch.ones_like(mag)).to(x.dtype).view(-1, 1, 1, 1)
    gray = _gray_floor(x)
    degenerate = torch.where(
        (op == OP_ID["Color"]).view(-1, 1, 1, 1), gray, torch.zeros((), dtype=x.dtype, device=x.device)
    )
    degenerate = torch.where(
        (op == OP_ID["Contrast"]).view(-1, 1, 1, 1), gray.mean(dim=(1, 2, 3), keepdim=True), degenerate
    )
    degenerate = torch.where((op == OP_ID["Sharpness"]).view(-1, 1, 1, 1), _sharpness_degenerate(x), degenerate)
    out = (x * ratio).add_(degenerate * (1.0 - ratio)).clamp_(0, 255).floor_()
    return torch.where(is_blend.view(-1, 1, 1, 1), out, x)


def _posterize_solarize(x, op, mag):
    """Posterize (keep the top `bits` bits) and Solarize/Invert (invert at or above a threshold)."""
    bits = torch.where(op == OP_ID["Posterize"], mag, torch.full_like(mag, 8.0))
    step = torch.pow(2.0, 8.0 - bits).to(x.dtype).view(-1, 1, 1, 1)
    x = torch.floor(x / step) * step
    # x holds integers: x >= t (float64, as torchvision's bound * magnitude) iff x >= ceil(t), exact in float32
    threshold = torch.where(
        op == OP_ID["Solarize"], torch.ceil(255.0 * mag.to(torch.float64)), torch.full_like(mag, 256.0)
    )
    threshold = torch.where(op == OP_ID["Invert"], torch.zeros_like(mag), threshold).to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255.0 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) / inv_scale).clamp_(0, 255).floor_()


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's equalize per (sample, channel): 256-bin histograms from one scatter_add, a LUT gather."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    if x.device.type == "cpu":  # one bincount over (row, value) pairs: much faster than scatter_add here
        offsets = torch.arange(b * c, device=x.device).view(-1, 1) * 256
        hist = torch.bincount((flat + offsets).flatten(), minlength=b * c * 256).view(b * c, 256)
    else:  # bincount would make the host wait for the device (it reads the maximum)
        hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device)
        hist.scatter_add_(1, flat, torch.ones_like(flat))
    cum = hist.cumsum(1)
    last = cum.argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    lut = ((cum[:, :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    out = lut.gather(1, flat).to(x.dtype).view(b, c, h, w)
    return torch.where((step != 0).view(b, c, 1, 1), out, x)


def erase(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """Set each sample's box (top, left, h, w; h = 0: none) to `value`, in place: on the CPU each box's
    slice (the host has the boxes), elsewhere two broadcast masks and one fill (no host sync)."""
    if x.device.type == "cpu":
        for i, (top, left, bh, bw) in enumerate(boxes.tolist()):
            if bh and bw:
                x[i, :, top:top + bh, left:left + bw] = value
        return x
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    top, left, bh, bw = boxes.unbind(1)
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    return x.masked_fill_(mask, value)  # x is the batch's own float copy


def policy_spec(aug, height: int, width: int) -> Optional[PolicySpec]:
    """The PolicySpec of an AugmentConfig (None: data.augment.policy=none)."""
    if aug.policy == "none" or aug.policy == "randaugment" and aug.num_ops == 0:  # RandAugment(num_ops=0): the identity
        return None
    return PolicySpec(aug.policy, aug.num_ops, aug.magnitude, aug.num_magnitude_bins, height, width)
