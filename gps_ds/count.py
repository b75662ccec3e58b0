"""How many parameters each method trains, from shapes alone (no data, no weights)."""

from __future__ import annotations

import math

import torch.nn as nn

from gps_ds.rules import ParamRoles, trainable_names


def rows_and_fan_in(shape: tuple[int, ...]) -> tuple[int, int]:
    """A candidate weight as (rows, fan_in): Linear (out, in); Conv (out, in/groups*kh*kw)."""
    return shape[0], math.prod(shape[1:])


def check_k(name: str, shape: tuple[int, ...], k: int) -> None:
    _, fan_in = rows_and_fan_in(shape)
    if k <= 0 or k > fan_in:
        raise ValueError(f"gps.k={k} is out of range for '{name}' (fan_in {fan_in}); use 1 <= k <= {fan_in}")


def count_parameters(model: nn.Module, roles: ParamRoles, k: int) -> dict:
    """Trained parameter counts for gps (selected + whole), full, linear and bitfit."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    backbone = total - sum(sizes[n] for n in roles.head)
    selected = 0
    for n in roles.candidates:
        check_k(n, shapes[n], k)
        selected += rows_and_fan_in(shapes[n])[0] * k

    def entry(sel: int, names: list[str]) -> dict:
        whole = sum(sizes[n] for n in names)
        return {
            "selected": sel, "whole": whole, "total": sel + whole,
            "percent_of_backbone": round(100.0 * (sel + whole) / backbone, 4) if backbone else None,
        }

    whole = trainable_names(roles, "gps")
    gps = entry(selected, whole)
    gps["biases"] = sum(sizes[n] for n in whole if n.endswith("bias") and n not in roles.head)
    gps["head"] = sum(sizes[n] for n in roles.head)
    gps["candidates"] = len(roles.candidates)
    return {
        "k": k,
        "family": roles.family,
        "parameters": total,
        "backbone": backbone,
        "gps": gps,
        "full": entry(0, trainable_names(roles, "full")),
        "linear": entry(0, trainable_names(roles, "linear")),
        "bitfit": entry(0, trainable_names(roles, "bitfit")),
        **wrapped_method_counts(model, roles, backbone),
    }


WRAPPED_METHODS = ("lora", "adapter", "vpt-shallow", "vpt-deep", "ssf")


def wrapped_method_counts(model: nn.Module, roles: ParamRoles, backbone: int) -> dict[str, dict]:
    """Counts of the methods that add modules, with their default options (a method that does not
    support the model's family is left out)."""
    from gps_ds.methods import MethodError, get_method

    out = {}
    for name in WRAPPED_METHODS:
        try:
            c = get_method(name).count_unwrapped(model, roles)
        except MethodError:
            continue
        c["percent_of_backbone"] = round(100.0 * c["total"] / backbone, 4) if backbone else None
        out[name] = c
    return out
