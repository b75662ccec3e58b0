"""Selection schemes: GPS and the paper's Table 12 ablations, one registry.

``select(scheme, scores, weights, k, seed)`` returns a *selection*:
``dict[name, int64 tensor (rows, C)]`` of column indices into each candidate's row
flattened to ``fan_in`` (Linear ``(out, in)``: rows=out, fan_in=in; Conv
``(out, in/groups, kh, kw)``: rows=out, fan_in=in/groups*kh*kw).  Each row is
sorted ascending.

Schemes
-------
``gps``           per row, top-K of the scores (C = K).
``net``           one global top-N over every entry of every candidate, N = the gps
                  budget (sum of rows*K).  Ties: tensor order as given, then flat index.
``layer``         per tensor, top-(rows*K) over the whole tensor.
``random-net``    N entries uniformly at random (without replacement) over all candidates.
``random-neuron`` K random columns per row.
``magnitude``     per row, top-K of |W|.

Score ties everywhere: larger first, equal -> smaller (column / flat) index first.

Padding
-------
For ``net``, ``layer`` and ``random-net`` the number of entries per row varies.
Each row then holds its selected columns ascending, padded at the END with ``-1``
up to the tensor's largest per-row count (C = that maximum, possibly 0).  ``-1``
means "no entry" (sparse mode skips it).  ``gps``, ``random-neuron`` and
``magnitude`` never pad.

The random schemes draw from one ``torch.Generator`` seeded with ``seed`` and
consumed in the candidates' order, so the same inputs and seed give the same
selection; the deterministic schemes ignore ``seed``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from .topk import rowwise_topk

__all__ = ["SCHEMES", "select", "gps_budget", "rows_and_fan_in", "flat_to_padded"]

Selection = dict[str, torch.Tensor]


def rows_and_fan_in(name: str, shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """(rows, fan_in) of a candidate weight of ``shape``; refuses < 2 dimensions."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"parameter {name!r} with shape {shape} is not a candidate: needs >= 2 dimensions"
        )
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return shape[0], fan_in


def _check_k(k: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    for name, shape in shapes.items():
        _, fan_in = rows_and_fan_in(name, shape)
        if k <= 0 or k > fan_in:
            raise ValueError(
                f"k={k} is invalid for parameter {name!r} (fan_in={fan_in}): need 1 <= k <= fan_in"
            )


def gps_budget(shapes: Mapping[str, tuple[int, ...]], k: int) -> int:
    """Entries GPS selects: sum over candidates of rows * k."""
    return sum(rows_and_fan_in(n, s)[0] * k for n, s in shapes.items())


def flat_to_padded(flat_idx: torch.Tensor, rows: int, fan_in: int) -> torch.Tensor:
    """Ascending flat indices of one tensor -> (rows, C) columns, -1 padded at the end."""
    flat_idx = flat_idx.reshape(-1).long()
    if flat_idx.numel() == 0:
        return torch.empty((rows, 0), dtype=torch.long, device=flat_idx.device)
    flat_idx = torch.sort(flat_idx).values
    r = torch.div(flat_idx, fan_in, rounding_mode="floor")
    c = flat_idx - r * fan_in
    counts = torch.bincount(r, minlength=rows)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat_idx.numel(), device=flat_idx.device) - starts[r]
    out = torch.full((rows, width), -1, dtype=torch.long, device=flat_idx.device)
    out[r, pos] = c
    return out


def _rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    rows, fan_in = rows_and_fan_in(name, t.shape)
    return t.detach().reshape(rows, fan_in)


# --------------------------------------------------------------------------- schemes


def _gps(scores: Mapping[str, torch.Tensor], k: int, seed: int) -> Selection:
    return {n: rowwise_topk(_rows_view(n, s), k) for n, s in scores.items()}


def _magnitude(weights: Mapping[str, torch.Tensor], k: int, seed: int) -> Selection:
    return {n: rowwise_topk(_rows_view(n, w).abs(), k) for n, w in weights.items()}


def _split_global(
    flat_global: torch.Tensor, shapes: Mapping[str, tuple[int, ...]]
) -> Selection:
    """Ascending indices into the concatenation of all candidates -> per-tensor padded."""
    out: Selection = {}
    offset = 0
    flat_global = torch.sort(flat_global.reshape(-1)).values
    for name, shape in shapes.items():
        rows, fan_in = rows_and_fan_in(name, shape)
        n = rows * fan_in
        lo = torch.searchsorted(flat_global, offset)
        hi = torch.searchsorted(flat_global, offset + n)
        out[name] = flat_to_padded(flat_global[lo:hi] - offset, rows, fan_in)
        offset += n
    return out


def _net(scores: Mapping[str, torch.Tensor], k: int, seed: int) -> Selection:
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    budget = gps_budget(shapes, k)
    cat = torch.cat([s.detach().reshape(-1) for s in scores.values()])
    idx = rowwise_topk(cat.view(1, -1), budget)[0]
    return _split_global(idx, shapes)


def _layer(scores: Mapping[str, torch.Tensor], k: int, seed: int) -> Selection:
    out: Selection = {}
    for name, s in scores.items():
        rows, fan_in = rows_and_fan_in(name, s.shape)
        idx = rowwise_topk(s.detach().reshape(1, -1), rows * k)[0]
        out[name] = flat_to_padded(idx, rows, fan_in)
    return out


def _sample_without_replacement(total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct uniform indices in ``[0, total)``.

    Small ``n``: sequential draws with duplicates rejected in draw order (keeping
    the *first* occurrences in draw order keeps every n-subset equally likely).
    Large ``n``: a prefix of a random permutation.
    """
    if n > total:
        raise ValueError(f"cannot draw {n} distinct entries out of {total}")
    if n * 4 >= total:
        return torch.randperm(total, generator=gen)[:n]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n:
        need = n - chosen.numel()
        draws = torch.randint(0, total, (need + need // 8 + 16,), generator=gen)
        seq = torch.cat([chosen, draws])
        uniq, inv = torch.unique(seq, sorted=True, return_inverse=True)
        first = torch.full((uniq.numel(),), seq.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(seq.numel()), reduce="amin")
        chosen = uniq[torch.argsort(first)][:n]
    return chosen


def _random_net(shapes: Mapping[str, tuple[int, ...]], k: int, seed: int) -> Selection:
    gen = torch.Generator().manual_seed(int(seed))
    total = sum(rows_and_fan_in(n, s)[0] * rows_and_fan_in(n, s)[1] for n, s in shapes.items())
    idx = _sample_without_replacement(total, gps_budget(shapes, k), gen)
    return _split_global(idx, shapes)


def _random_neuron(shapes: Mapping[str, tuple[int, ...]], k: int, seed: int) -> Selection:
    gen = torch.Generator().manual_seed(int(seed))
    out: Selection = {}
    for name, shape in shapes.items():
        rows, fan_in = rows_and_fan_in(name, shape)
        # i.i.d. uniform keys per entry; the row's top-k keys are a uniform k-subset.
        keys = torch.rand((rows, fan_in), generator=gen)
        out[name] = rowwise_topk(keys, k)
    return out


SCHEMES: dict[str, str] = {
    "gps": "scores",
    "net": "scores",
    "layer": "scores",
    "random-net": "shapes",
    "random-neuron": "shapes",
    "magnitude": "weights",
}
_IMPL: dict[str, Callable] = {
    "gps": _gps,
    "net": _net,
    "layer": _layer,
    "random-net": _random_net,
    "random-neuron": _random_neuron,
    "magnitude": _magnitude,
}


def select(
    scheme: str,
    scores: Optional[Mapping[str, torch.Tensor]],
    weights: Optional[Mapping[str, torch.Tensor]],
    k: int,
    seed: int = 0,
) -> Selection:
    """Select entries of every candidate parameter with ``scheme`` (see module doc).

    The candidates are the keys of ``scores`` (or of ``weights`` when ``scores`` is
    None), in that order.  ``scores`` is needed by gps/net/layer, ``weights`` by
    magnitude; the random schemes need only the shapes of either.
    """
    if scheme not in _IMPL:
        raise ValueError(
            f"unknown selection scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}"
        )
    if scores is None and weights is None:
        raise ValueError(f"scheme {scheme!r} needs scores or weights, got neither")
    source = scores if scores is not None else weights
    assert source is not None
    shapes = {n: tuple(t.shape) for n, t in source.items()}
    _check_k(k, shapes)
    need = SCHEMES[scheme]
    if need == "scores":
        if scores is None:
            raise ValueError(f"scheme {scheme!r} needs gradient scores")
        return _IMPL[scheme](scores, k, seed)
    if need == "weights":
        if weights is None:
            raise ValueError(f"scheme {scheme!r} needs the weights")
        ws: dict[str, torch.Tensor] = {}
        for n, shape in shapes.items():
            if n not in weights:
                raise ValueError(f"scheme {scheme!r}: no weight given for parameter {n!r}")
            if tuple(weights[n].shape) != shape:
                raise ValueError(
                    f"scheme {scheme!r}: weight {n!r} has shape {tuple(weights[n].shape)}, "
                    f"scores have {shape}"
                )
            ws[n] = weights[n]
        return _IMPL[scheme](ws, k, seed)
    return _IMPL[scheme](shapes, k, seed)
