"""SparseLinear / SparseConv2d: frozen base weight + K trainable entries per output row.

State (names stable for checkpoints and optimizers):
  weight       frozen base (requires_grad=False) with the selected entries set to 0
  bias         unchanged
  gps_values   trainable (rows, K): the selected weights themselves (not differences)
  gps_indices  int64 buffer (rows, K), -1 marks end-of-row padding
  gps_valid    bool buffer (rows, K), registered only when some row is padded
Effective weight: W[r, gps_indices[r, k]] = gps_values[r, k], every other entry = weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import settings as S
from .autograd import gathered, sparse_conv2d, sparse_linear
from .conv_kernels import ConvGeometry
from .indices import IndexPlan, build_plan, check_indices
from .linear_kernels import effective_weight


class _SparseWeight:
    """Behaviour shared by SparseLinear and SparseConv2d (mixed into the nn class)."""

    weight: nn.Parameter
    gps_values: nn.Parameter
    gps_indices: Tensor

    def _sparsify(self, indices: Tensor, valid: Tensor | None, values_dtype: torch.dtype | None) -> None:
        weight = self.weight
        if hasattr(weight, "ds_id"):  # ZeRO-3 partitioned: take and zero the entries of this rank's partition
            values = _take_partitioned(weight, indices, valid).to(values_dtype or weight.dtype)
            self._register_sparse(weight, values, indices, valid)
            return
        rows = weight.shape[0]
        with torch.no_grad():
            if not weight.is_contiguous():
                weight.data = weight.data.contiguous()
            flat = weight.data.view(rows, -1)
            indices = indices.to(flat.device)
            valid = None if valid is None else valid.to(flat.device)
            idx = indices if valid is None else indices.clamp(min=0)
            values = flat.gather(1, idx).to(values_dtype or weight.dtype)
            if valid is None:
                flat.scatter_(1, idx, 0)
            else:
                values.masked_fill_(~valid, 0)
                r = torch.arange(rows, device=flat.device).unsqueeze(1).expand_as(idx)
                flat[r[valid], idx[valid]] = 0
        self._register_sparse(weight, values, indices, valid)

    def _register_sparse(self, weight: nn.Parameter, values: Tensor, indices: Tensor, valid: Tensor | None) -> None:
        self._gps_weight_requires_grad = weight.requires_grad
        weight.requires_grad_(False)
        self.gps_values = nn.Parameter(values)
        self.register_buffer("gps_indices", indices)
        if valid is not None:
            self.register_buffer("gps_valid", valid)
        self._gps_plan = None

    @property
    def gps_valid_mask(self) -> Tensor | None:
        return self._buffers.get("gps_valid")

    def _plan(self) -> IndexPlan:
        valid = self.gps_valid_mask
        ratio = S.SETTINGS.compact_ratio if isinstance(self, nn.Linear) else 0.0
        plan = self._gps_plan
        if plan is None or not plan.matches(self.gps_indices, valid, ratio):
            plan = build_plan(self.gps_indices, valid, self.weight[0].numel(), ratio)
            self._gps_plan = plan
        return plan

    def merged_weight(self) -> Tensor:
        """The dense effective weight (detached, shaped like ``weight``)."""
        with torch.no_grad(), gathered(self.weight, self.gps_values):
            plan = self._plan()
            return effective_weight(self.weight, self.gps_values, plan.idx, plan.valid)

    def _sparse_repr(self) -> str:
        padded = ", padded" if self.gps_valid_mask is not None else ""
        return f"k={self.gps_indices.shape[1]}{padded}"


def _take_partitioned(weight: nn.Parameter, indices: Tensor, valid: Tensor | None) -> Tensor:
    """The selected entries (rows, K) of a ZeRO-3 partitioned weight, zeroed in place in every rank's
    partition; never gathers the weight: each rank fills what it holds and one all-reduce (a
    collective: every rank calls it for the same weights in the same order) sums the pieces."""
    import torch.distributed as dist

    shape = tuple(weight.ds_shape)
    rows, fan_in = shape[0], int(weight.ds_numel) // shape[0]
    part = weight.ds_tensor.data
    group = weight.ds_process_group
    pn = int(weight.partition_numel())
    start = (dist.get_rank(group=group) if dist.is_initialized() else 0) * pn
    end = min(start + pn, int(weight.ds_numel))
    idx = indices.to(part.device)
    ok = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid.to(part.device)
    flat = torch.arange(rows, device=part.device).unsqueeze(1) * fan_in + idx.clamp(min=0)
    mine = ok & (flat >= start) & (flat < end)
    values = torch.zeros(idx.shape, dtype=torch.float32, device=part.device)
    with torch.no_grad():
        local = flat[mine] - start
        values[mine] = part[local].float()
        part[local] = 0
    if dist.is_initialized() and dist.get_world_size(group=group) > 1:
        comm = values.cuda() if dist.get_backend(group) == "nccl" and values.device.type != "cuda" else values
        dist.all_reduce(comm, group=group)  # each entry is owned by one rank: a sum of zeros and itself
        values = comm.to(part.device)
    return values


class SparseLinear(_SparseWeight, nn.Linear):
    """nn.Linear whose weight trains only the selected entries (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        indices: Tensor,
        bias: bool = True,
        device=None,
        dtype=None,
        values_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        idx, valid = check_indices("weight", indices, out_features, in_features)
        self._gps_base_class = nn.Linear
        self._sparsify(idx, valid, values_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return sparse_linear(x, self.weight, self.gps_values, self.bias, self._plan())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._sparse_repr()}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SparseConv2d(_SparseWeight, nn.Conv2d):
    """nn.Conv2d whose weight trains only the selected entries (see module docstring).

    Supports stride, dilation, groups (incl. depthwise) and padding given as int, tuple,
    'valid' or 'same'; padding_mode must be 'zeros'.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        indices: Tensor,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
        values_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            device=device, dtype=dtype,
        )
        fan_in = self.weight[0].numel()
        idx, valid = check_indices("weight", indices, out_channels, fan_in)
        self._gps_base_class = nn.Conv2d
        self._sparsify(idx, valid, values_dtype)

    def _geometry(self) -> tuple[ConvGeometry, list[int] | None]:
        """Numeric geometry, plus an explicit F.pad for asymmetric 'same' padding."""
        ks, dil = _pair(self.kernel_size), _pair(self.dilation)
        pre_pad = None
        if isinstance(self.padding, str):
            if self.padding == "valid":
                padding = (0, 0)
            else:  # 'same' (stride 1 is enforced by nn.Conv2d)
                totals = [d * (k - 1) for d, k in zip(dil, ks)]
                lefts = [t // 2 for t in totals]
                padding = (lefts[0], lefts[1])
                if any(t != 2 * left for t, left in zip(totals, lefts)):
                    (th, tw), (lh, lw) = totals, lefts
                    pre_pad = [lw, tw - lw, lh, th - lh]
                    padding = (0, 0)
        else:
            padding = _pair(self.padding)
        geo = ConvGeometry(ks, _pair(self.stride), padding, dil, self.groups)
        return geo, pre_pad

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        geo, pre_pad = self._geometry()
        if pre_pad is not None:
            x = F.pad(x, pre_pad)
        y = sparse_conv2d(x, self.weight, self.gps_values, self.bias, self._plan(), geo)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._sparse_repr()}"
