"""Voxel refiners of the released Direct3D-S2 pipeline (model_refiner.ckpt, model_refiner_1024.ckpt).

Both run a dense 3D UNet over overlapping cubic patches of a grid and remove what the sparse SDF
cannot express: the decoded SDF is only known in its narrow band (1 elsewhere, "outside"), so a closed
surface also has a spurious inner wall where the band meets the 1-filled interior.

- ``kind="sdf"`` (Voxel_RefinerXL, 512³): per patch, the band SDF (1 outside it) through a 3³ conv, and
  the SS-VAE decoder's last features through a per-voxel MLP (zero features outside the band), into
  the UNet; then three adaptive 3³ smoothing steps (per-voxel 27-tap kernels, L1-normalised, each
  applied three times) around a conv and the output conv, and tanh. Patches of 192 with stride 160
  are blended linearly over their 32-voxel overlaps into a dense 512³ field, marched at the release's
  threshold (twice the sparse stage's: 0.4).
- ``kind="sign"`` (Voxel_RefinerXL_sign, 1024³): the band SDF is mean-pooled to 512³ (1 outside), the
  UNet predicts a sign (sigmoid >= 0.5 -> +1, else -1) per 512³ voxel, patch by patch (stride 128,
  later patches overwrite). The refined 1024³ field keeps the decoded SDF on the band and is the
  upsampled sign elsewhere; it is marched at the sparse stage's threshold (0.2).

What we do differently from the release, with the same result: no dense copy of the features (the
MLP of a zero feature is one constant vector; each patch scatters its band voxels over it), no dense
1024³ array (the refined field is built slab by slab and only the corners of cells that straddle the
threshold are kept, as a sparse SDF for ``model.mesh_extract``), and one UNet pass for all the patches that
hold no band voxel (their inputs are equal, so are their outputs; 4.8 of 27 at 512³ and 2.9 at 1024³ on the
sample corpus). Dense arrays left: the 512³ output
of the sdf refiner (float32, 0.5 GiB) and the 512³ sign grid (int8, 128 MiB).

State-dict keys equal the release's (the UNet's are diffusers-style names), so ``official_to_ours`` /
``ours_to_official`` only check keys and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.conv3d import conv3d_3x3
from kernels.group_norm import group_norm_act
from kernels.smooth import adaptive_smooth
from model.configs import strict_from_dict
from model.dense_vae import check_layout, named_config


@dataclass(frozen=True)
class RefinerConfig:
    kind: str = "sdf"  # "sdf" (Voxel_RefinerXL, 512³) | "sign" (Voxel_RefinerXL_sign, 1024³ from a 512³ sign)
    in_channels: int = 1
    out_channels: int = 1
    width: int = 8  # the features around the UNet (its first level's channels)
    block_channels: tuple = (8, 32, 128, 512)
    layers_per_block: int = 2
    layers_mid_block: int = 2
    norm_groups: int = 4
    norm_eps: float = 1e-5
    feat_channels: int = 32  # SS-VAE decoder features the sdf refiner reads
    patch_size: int = 192
    res: int = 512  # the grid the UNet runs on (the sign refiner's output grid is twice it)
    overlap: int = 32  # sdf refiner: blended voxels between neighbouring patches (stride = patch - overlap)
    sign_stride: int = 128  # sign refiner: patch stride
    infer_patch_size: int = 192  # a released parameter the released code never reads

    def __post_init__(self):
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))
        if self.kind not in ("sdf", "sign"):
            raise ValueError(f"refiner kind must be 'sdf' or 'sign', got {self.kind!r}")
        if self.block_channels[0] != self.width:
            raise ValueError(f"block_channels[0] ({self.block_channels[0]}) must equal width ({self.width})")
        if any(c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"block_channels {self.block_channels} must be multiples of norm_groups {self.norm_groups}")
        if self.kind == "sdf" and self.res != 2 * (self.patch_size - self.overlap) + self.patch_size:
            raise ValueError(f"sdf refiner: three patches of {self.patch_size} overlapping by {self.overlap} cover "
                             f"{3 * self.patch_size - 2 * self.overlap}, not res {self.res}")
        if self.kind == "sdf" and not 0 < self.overlap <= self.patch_size - self.overlap:
            raise ValueError(f"sdf refiner: overlap {self.overlap} must be in (0, patch_size / 2]")

    @property
    def stride(self) -> int:
        return self.patch_size - self.overlap if self.kind == "sdf" else self.sign_stride

    @property
    def output_res(self) -> int:
        return self.res if self.kind == "sdf" else 2 * self.res

    @classmethod
    def named(cls, name: str, **overrides) -> "RefinerConfig":
        return named_config(REFINER_CONFIGS, name, overrides, "refiner")

    @classmethod
    def from_official(cls, params: dict, kind: str | None = None) -> "RefinerConfig":
        """Our config from the ``params:`` of Voxel_RefinerXL (``kind="sdf"``) or Voxel_RefinerXL_sign
        (``kind="sign"``); without ``kind``, a params mapping naming ``infer_patch_size`` is the sign one."""
        kind = kind or ("sign" if "infer_patch_size" in params else "sdf")
        defaults = _OFFICIAL_DEFAULTS[kind]
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise ValueError(f"Voxel_RefinerXL{'_sign' if kind == 'sign' else ''}: unknown parameter(s) {unknown}")
        p = {**defaults, **params}
        return cls(kind=kind, in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]),
                   layers_per_block=int(p["layers_per_block"]), layers_mid_block=int(p["layers_mid_block"]),
                   patch_size=int(p["patch_size"]), res=int(p["res"]),
                   infer_patch_size=int(p.get("infer_patch_size", 192)))

    @classmethod
    def from_dict(cls, d: dict) -> "RefinerConfig":
        return strict_from_dict(cls, d)


# use_checkpoint / use_fp16 only concern the release's training and storage dtype
_OFFICIAL_SDF = dict(in_channels=1, out_channels=1, layers_per_block=2, layers_mid_block=2, patch_size=192, res=512,
                     use_checkpoint=False, use_fp16=False)
_OFFICIAL_DEFAULTS = {"sdf": _OFFICIAL_SDF, "sign": {**_OFFICIAL_SDF, "infer_patch_size": 192}}

REFINER_CONFIGS = {
    "paper": RefinerConfig(),  # model_refiner.ckpt
    "paper_1024": RefinerConfig(kind="sign"),  # model_refiner_1024.ckpt
    # Same layouts, narrow and small: run on a CPU (tests).
    "debug": RefinerConfig(block_channels=(8, 8, 16, 16), layers_per_block=1, layers_mid_block=1, feat_channels=32,
                           patch_size=16, overlap=4, res=40),
    "debug_1024": RefinerConfig(kind="sign", block_channels=(8, 8, 16, 16), layers_per_block=1, layers_mid_block=1,
                                patch_size=16, sign_stride=8, res=32),
}


# -- the UNet (UNet3DModel of the release: diffusers-style blocks) --------------------------------------


# On CUDA in half precision, the 3³ convolutions with at most 8 input and 32 output channels (the UNet's first
# level, the input and output layers, the smoothing-weight nets: 16 of the sdf refiner's 3³ convolutions at 192³
# and one at 96³, 11 of the sign refiner's) run in kernels/conv3d (its packed implicit-GEMM form) instead of
# cuDNN: a patch 74.0 -> 58.1 ms (sdf) and 57.4 -> 45.2 ms (sign) on an H100. Wider inputs stay with cuDNN,
# which is faster there (benchmarks/RESULTS.md "The refiners", --convs).
SMALL_CONVS = True


class Conv3x3(nn.Conv3d):
    """nn.Conv3d(cin, cout, 3, padding=1) (the release's keys and init) whose narrow calls may take kernels/conv3d."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (SMALL_CONVS and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.in_channels <= 8
                and self.out_channels <= 32):
            return conv3d_3x3(x, self.weight, self.bias)
        return super().forward(x)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)) with float32 statistics whatever the weights' dtype, in x's dtype: one Triton
    statistics pass and one fused pass on CUDA (kernels.group_norm), the float32 reference elsewhere."""
    return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)


class ResnetBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv3x3(cin, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = Conv3x3(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _Sampler(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, downsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, groups, eps) for i in range(layers))
        self.downsamplers = nn.ModuleList([_Sampler(nn.Conv3d(cout, cout, 2, stride=2))]) if downsample else None

    def forward(self, h):
        skips = []
        for r in self.resnets:
            h = r(h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock3D(nn.Module):
    def __init__(self, cin: int, prev: int, cout: int, layers: int, upsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D((prev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, groups, eps)
            for i in range(layers))
        self.upsamplers = nn.ModuleList([_Sampler(nn.ConvTranspose3d(cout, cout, 2, stride=2))]) if upsample else None

    def forward(self, h, skips):
        for r in self.resnets:
            h = r(torch.cat([h, skips.pop()], dim=1))
        return self.upsamplers[0](h) if self.upsamplers is not None else h


class UNetMidBlock3D(nn.Module):
    def __init__(self, c: int, layers: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(c, c, groups, eps) for _ in range(layers + 1))

    def forward(self, h):
        for r in self.resnets:
            h = r(h)
        return h


class UNet3D(nn.Module):
    """conv_in, down blocks (resnets + stride-2 conv), mid block, up blocks (resnets over the concatenated
    skips + stride-2 transposed conv), GroupNorm + SiLU; no output conv (the refiners add their own)."""

    def __init__(self, cin: int, channels: tuple, layers: int, mid_layers: int, groups: int, eps: float):
        super().__init__()
        n = len(channels)
        self.conv_in = Conv3x3(cin, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock3D(channels[max(i - 1, 0)], channels[i], layers, i < n - 1, groups, eps) for i in range(n))
        self.mid_block = UNetMidBlock3D(channels[-1], mid_layers, groups, eps)
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock3D(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], layers + 1, i < n - 1, groups, eps)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)

    def forward(self, x):
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h)
            skips.extend(s)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h, skips)
        return _norm_silu(self.conv_norm_out, h)


# -- the sdf refiner's pieces ------------------------------------------------------------------------


def _kernel_net(width: int) -> nn.Sequential:
    return nn.Sequential(Conv3x3(width, width), nn.ReLU(),
                         Conv3x3(width, 27, bias=False))


class FeatureMLP(nn.Module):
    """Per-voxel MLP of the SS-VAE decoder's features (GeoDecoder: 3 hidden ReLU layers of 32)."""

    def __init__(self, cin: int, width: int, hidden: int = 32, layers: int = 4):
        super().__init__()
        mods = [nn.Linear(cin, hidden), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*mods, nn.Linear(hidden, width))

    def forward(self, x):
        return self.net(x)


# -- the refiner -------------------------------------------------------------------------------------


class VoxelRefiner(nn.Module):
    """The released refiner of ``cfg.kind``; ``run`` is its inference on one shape."""

    def __init__(self, cfg: RefinerConfig = REFINER_CONFIGS["paper"]):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        unet_in = 2 * w if cfg.kind == "sdf" else w
        self.unet3d1 = UNet3D(unet_in, cfg.block_channels, cfg.layers_per_block, cfg.layers_mid_block,
                              cfg.norm_groups, cfg.norm_eps)
        self.conv_in = Conv3x3(cfg.in_channels, w)
        if cfg.kind == "sdf":
            self.latent_mlp = FeatureMLP(cfg.feat_channels, w)
            self.adaptive_conv1 = _kernel_net(w)
            self.adaptive_conv2 = _kernel_net(w)
            self.adaptive_conv3 = _kernel_net(w)
            self.mid_conv = Conv3x3(w, w)
        self.conv_out = Conv3x3(w, cfg.out_channels)

    @property
    def config(self) -> RefinerConfig:
        return self.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def cast_weights(self, dtype: torch.dtype) -> "VoxelRefiner":
        """Convolutions and linears to ``dtype``, norms kept in float32: what the release's ``use_fp16`` /
        ``convert_to_fp16`` converts. Returns self."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
                m.to(dtype)
        return self

    def forward(self, sdf: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """One patch: sdf (B, 1, D, H, W) and, for the sdf refiner, the MLP'd features (B, width, D, H, W)
        -> the refined SDF in [-1, 1] (sdf refiner) or the sign logits (sign refiner)."""
        h = self.conv_in(sdf)
        if self.cfg.kind == "sign":
            return self.conv_out(self.unet3d1(h))
        mid = self.unet3d1(torch.cat([h, feats], dim=1))
        # three adaptive 3³ smoothing steps (kernels.smooth: weights L1-normalised per voxel, float32 sums)
        mid = adaptive_smooth(mid, self.adaptive_conv1(mid))
        mid = self.mid_conv(mid)
        mid = adaptive_smooth(mid, self.adaptive_conv2(mid))
        out = self.conv_out(mid)
        out = adaptive_smooth(out, self.adaptive_conv3(mid))
        return torch.tanh(out)

    def forward_patch(self, sdf: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """One patch as the release's loop body computes it: the sdf refiner from the raw decoder features
        (B, feat_channels, D, H, W) -> tanh output; the sign refiner -> sigmoid (>= 0.5 is outside)."""
        if self.cfg.kind == "sign":
            return torch.sigmoid(self(sdf))
        return self(sdf, self.latent_mlp(feats.movedim(1, -1)).movedim(-1, 1))

    # -- inference on one shape --------------------------------------------------------------------
    def _patch_input(self, coords: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, lo: tuple, size: tuple,
                     fill_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Dense (1, C, *size) crop at ``lo``: the ``values`` of the voxels ``rows`` (all inside the crop) at their
        places, ``fill_rows`` (default 1) elsewhere. No host read: the rows come from ``_patch_rows``."""
        local = coords[rows].long()
        vals = values[rows]
        c = vals.shape[1]
        out = fill_rows.reshape(c, 1, 1, 1).expand(c, *size).clone() if fill_rows is not None else \
            torch.ones(c, *size, device=values.device, dtype=values.dtype)
        out[:, local[:, 0] - lo[0], local[:, 1] - lo[1], local[:, 2] - lo[2]] = vals.t()
        return out[None]

    def _patch_rows(self, coords: torch.Tensor, stride: int) -> list[torch.Tensor]:
        """The rows of ``coords`` inside each of ``_patches(stride)``, in its order, from two host reads for
        all 27 patches (a boolean selection per patch would read the device four times a patch)."""
        c = coords.long()
        per_axis = [torch.stack([(c[:, a] >= lo) & (c[:, a] < lo + n) for lo, n in self._axis_ranges(stride)])
                    for a in range(3)]  # (3, N) each: inside the i-th range along axis a
        inside = (per_axis[0][:, None, None] & per_axis[1][None, :, None] & per_axis[2][None, None, :])
        inside = inside.reshape(27, -1)
        rows = inside.nonzero()[:, 1]  # grouped by patch (row-major order), ascending inside a patch
        ends = inside.sum(1).cumsum(0).tolist()
        return list(torch.tensor_split(rows, ends[:-1]))

    def _axis_ranges(self, stride: int) -> list[tuple[int, int]]:
        """(start, length) of the three patch ranges along an axis."""
        return [(stride * i, min(self.cfg.patch_size, self.cfg.res - stride * i)) for i in range(3)]

    def _patches(self, stride: int):
        """(lo, size) of the 27 patches, i (x) slowest and k (z) fastest, as ``_patch_rows`` lists them."""
        ranges = self._axis_ranges(stride)
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    (a, na), (b, nb), (c, nc) = ranges[i], ranges[j], ranges[k]
                    yield (a, b, c), (na, nb, nc)

    def _each_patch(self, coords: torch.Tensor, stride: int, patch, reuse_empty: bool):
        """(lo, size, patch(lo, size, rows)) for each of ``_patches(stride)``, rows being those of ``coords`` in it.
        A patch without a voxel has the same input as every other such patch, so with ``reuse_empty`` its output
        is computed once a size."""
        done: dict[tuple, torch.Tensor] = {}
        for (lo, size), inside in zip(self._patches(stride), self._patch_rows(coords, stride)):
            if reuse_empty and len(inside) == 0:
                if size not in done:
                    done[size] = patch(lo, size, inside)
                yield lo, size, done[size]
            else:
                yield lo, size, patch(lo, size, inside)

    @torch.no_grad()
    def refine_sdf(self, coords: torch.Tensor, values: torch.Tensor, feats: torch.Tensor,
                   reuse_empty: bool = True) -> torch.Tensor:
        """The sdf refiner's dense (res³) field from the band voxels (N, 3) at ``res``, their SDF (N,) and
        decoder features (N, feat_channels). Patches without a band voxel have the same input (SDF 1, the
        MLP of a zero feature), so with ``reuse_empty`` the UNet runs once for all of them (same output)."""
        cfg = self.cfg
        if cfg.kind != "sdf":
            raise ValueError("refine_sdf: this is the sign refiner (use refine_sign)")
        dt, dev, p, o, s = self.dtype, coords.device, cfg.patch_size, cfg.overlap, cfg.stride
        rows = self.latent_mlp(feats.to(dt))
        empty = self.latent_mlp(torch.zeros(1, feats.shape[1], device=dev, dtype=dt))[0]
        sdf = values.to(dt).reshape(-1, 1)
        ramp = torch.linspace(0, 1, o, device=dev)
        ones = torch.ones(p, device=dev)
        # linear blend over each overlap: the first patch of an axis fades out, the next fades in
        weights = [torch.cat([ones[:s], 1 - ramp]), torch.cat([ramp, ones[o:s], 1 - ramp]), torch.cat([ramp, ones[o:]])]
        out = torch.zeros(cfg.res, cfg.res, cfg.res, device=dev, dtype=torch.float32)  # blended in float32

        def patch(lo, size, inside):
            x = self._patch_input(coords, sdf, inside, lo, size)
            f = self._patch_input(coords, rows, inside, lo, size, fill_rows=empty)
            return self(x, f)[0, 0].float()

        for lo, size, y in self._each_patch(coords, s, patch, reuse_empty):
            wi, wj, wk = (weights[lo[a] // s] for a in range(3))
            out[lo[0]:lo[0] + p, lo[1]:lo[1] + p, lo[2]:lo[2] + p] += y * wi[:, None, None] * wj[None, :, None] * wk
        return out

    @torch.no_grad()
    def refine_sign(self, coords: torch.Tensor, values: torch.Tensor, reuse_empty: bool = True) -> torch.Tensor:
        """The sign refiner's res³ int8 sign grid (+1 outside, -1 inside) from the band voxels (N, 3) at
        2·res and their SDF (N,). With ``reuse_empty`` the patches without a band voxel (all input 1) share
        one UNet pass."""
        cfg = self.cfg
        if cfg.kind != "sign":
            raise ValueError("refine_sign: this is the sdf refiner (use refine_sdf)")
        half, mean = mean_pool_2(coords, values)
        sdf = mean.to(self.dtype).reshape(-1, 1)
        sign = torch.ones(cfg.res, cfg.res, cfg.res, device=coords.device, dtype=torch.int8)

        def patch(lo, size, inside):
            logits = self(self._patch_input(half, sdf, inside, lo, size))[0, 0]
            return torch.where(torch.sigmoid(logits) >= 0.5, 1, -1).to(torch.int8)

        for lo, size, block in self._each_patch(half, cfg.stride, patch, reuse_empty):
            sl = tuple(slice(a, a + n) for a, n in zip(lo, size))
            sign[sl] = block
        return sign

    @torch.no_grad()
    def run(self, coords: torch.Tensor, values: torch.Tensor, feats: torch.Tensor | None = None,
            mc_threshold: float | None = None, slab: int = 32, reuse_empty: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The released refiner's ``run`` on one shape, up to the marching: (coords (M, 3) int32, values (M,)
        float32, resolution) of every voxel at a corner of a cell whose values straddle ``mc_threshold``
        (default: the release's, 0.4 for the sdf refiner, 0.2 for the sign refiner). March it with
        ``model.mesh_extract.extract_mesh(coords, values, resolution, level=mc_threshold)`` (no fill: every
        straddling cell has all its corners here)."""
        cfg = self.cfg
        level = mc_threshold if mc_threshold is not None else (0.4 if cfg.kind == "sdf" else 0.2)
        if cfg.kind == "sdf":
            if feats is None:
                raise ValueError("the sdf refiner needs the SS-VAE decoder's features (decode with return_feat)")
            field = self.refine_sdf(coords, values, feats, reuse_empty=reuse_empty).float()
            return (*straddling_voxels(lambda a, b: field[a:b], cfg.res, level, slab), cfg.res)
        sign = self.refine_sign(coords, values, reuse_empty=reuse_empty)
        return (*straddling_voxels(sign_field_slab(sign, coords, values), cfg.output_res, level, slab), cfg.output_res)


def mean_pool_2(coords: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels (N, 3) and values (N,) -> their parents at half resolution and the mean of the children given."""
    parent, inv = torch.unique(torch.div(coords.long(), 2, rounding_mode="floor"), dim=0, return_inverse=True)
    total = torch.zeros(len(parent), dtype=torch.float64, device=values.device).index_add_(0, inv, values.double())
    count = torch.zeros(len(parent), dtype=torch.float64, device=values.device).index_add_(
        0, inv, torch.ones_like(values, dtype=torch.float64))
    return parent, (total / count).to(values.dtype)


def sign_field_slab(sign: torch.Tensor, coords: torch.Tensor, values: torch.Tensor):
    """The sign refiner's 2R³ field, a slab [a, b) of x at a time: the band's SDF on the band voxels,
    the sign of the voxel's parent elsewhere (``|1| · sign`` in the release)."""
    order = torch.argsort(coords[:, 0].long())
    coords, values = coords[order].long(), values[order].float()
    xs = coords[:, 0].contiguous()

    def slab(a: int, b: int) -> torch.Tensor:
        s = sign[a // 2:(b + 1) // 2].float()
        f = s.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)[a - a // 2 * 2:][:b - a]
        lo, hi = torch.searchsorted(xs, torch.tensor([a, b], device=xs.device)).tolist()
        c = coords[lo:hi]
        f[c[:, 0] - a, c[:, 1], c[:, 2]] = values[lo:hi]
        return f

    return slab


def straddling_voxels(field_slab, res: int, level: float, slab: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels at the corners of cells whose 8 values straddle ``level``, of a dense res³ field read a slab of
    x at a time (``field_slab(a, b)`` -> (b - a, res, res)): the sparse SDF that marches to the same surface."""
    out_c, out_v = [], []
    for x0 in range(0, res, slab):
        a, b = max(x0 - 1, 0), min(x0 + slab + 1, res)  # cells [a, b-1) touch the voxels [x0, x0 + slab)
        f = field_slab(a, b).float()
        v = f[None, None]
        mx = F.max_pool3d(v, 2, stride=1)
        mn = -F.max_pool3d(-v, 2, stride=1)
        cell = ((mn <= level) & (mx >= level) & (mn < mx)).float()
        corner = F.max_pool3d(F.pad(cell, (1, 1, 1, 1, 1, 1)), 2, stride=1)[0, 0] > 0
        corner[: x0 - a] = False
        corner[x0 + slab - a:] = False
        idx = corner.nonzero()
        out_v.append(f[idx[:, 0], idx[:, 1], idx[:, 2]])
        idx[:, 0] += a
        out_c.append(idx.int())
    return torch.cat(out_c), torch.cat(out_v)


def official_to_ours(state_dict: dict, cfg: RefinerConfig) -> dict:
    """A released refiner's state dict ("refiner" of model_refiner*.ckpt) -> ours (same keys; checked)."""
    return check_layout(state_dict, VoxelRefiner, cfg, f"Voxel_RefinerXL{'_sign' if cfg.kind == 'sign' else ''}")


def ours_to_official(state_dict: dict, cfg: RefinerConfig) -> dict:
    """Inverse of ``official_to_ours``."""
    return check_layout(state_dict, VoxelRefiner, cfg, "VoxelRefiner (ours)")
