"""Combining adapters into a new one: the methods of PEFT's ``add_weighted_adapter``.

Adapters a_i with weights w_i and scalings s_i give, on each layer that carries any of
them, a new adapter with scaling 1 (alpha = rank):

- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; …] stacked along the rank, B = [B_1, B_2, …],
  so ΔW = Σ w_i s_i B_i A_i exactly, at rank Σ r_i.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B are
  each mixed elementwise (below), A with weights ±√|w_i s_i| (the sign of w_i s_i) and
  B with √|w_i s_i|. Needs equal ranks. ΔW = (Σ √… B_i)(Σ ±√… A_i) has cross terms
  B_i A_j, so it is not Σ w_i ΔW_i: a cheap approximation.
- ``svd`` and the ``*_svd`` methods: the ΔW_i = s_i B_i A_i are mixed (below), then
  factored again by a truncated SVD, ``B = U_k diag(S_k)``, ``A = V_kᵀ``, at rank k
  (default: the largest rank of the adapters). ``svd_clamp`` = q clips both factors to
  ± the q-quantile of their entries.

The elementwise mixes of tensors T_i (TIES: Yadav et al. 2023, arXiv:2306.01708; DARE:
Yu et al. 2023, arXiv:2311.03099), with d the ``density``:

- ``linear`` / ``svd``: Σ w_i T_i.
- ``magnitude_prune``: keep the int(d·n) entries of largest |·| of each T_i, then sum.
- ``ties``: magnitude-prune, elect a sign per entry (sign of Σ T_i, or of Σ sign T_i with
  ``majority_sign="frequency"``), then average the weighted T_i whose sign agrees.
- ``dare_linear``: keep each entry with probability d and divide by d, then sum.
- ``dare_ties``: DARE's pruning, then TIES' election and average.

Each number equals PEFT's; DARE's masks are drawn from ``generator`` (the global torch
generator by default) in PEFT's order: layer by layer, A of each adapter then B of
each (or ΔW of each for the SVD methods).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._adapters import check_names, layers_or_raise
from ._errors import ConfigError
from ._hyperparameters import validate_name
from ._layer import LoRALayer

#: method -> (pruning, whether TIES elects a sign, whether ΔW is refactored by SVD)
METHODS: dict[str, tuple[str | None, bool, bool]] = {
    "linear": (None, False, False),
    "cat": (None, False, False),
    "svd": (None, False, True),
    "ties": ("magnitude", True, False),
    "ties_svd": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
    "dare_linear_svd": ("random", False, True),
    "dare_ties_svd": ("random", True, True),
    "magnitude_prune": ("magnitude", False, False),
    "magnitude_prune_svd": ("magnitude", False, True),
}
_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclass(frozen=True)
class Recipe:
    """How one combination is computed, validated."""

    method: str
    prune: str | None
    elect: str | None  # None, "total" or "frequency"
    svd: bool
    density: float
    rank: int | None
    clamp: float | None
    full_matrices: bool
    driver: str | None
    generator: torch.Generator | None


# --------------------------------------------------------------------------- mixes
def _prune(t: Tensor, recipe: Recipe) -> Tensor:
    if recipe.prune is None or recipe.density >= 1:
        return t
    if recipe.prune == "magnitude":
        keep = torch.zeros_like(t).reshape(-1)
        keep[t.abs().reshape(-1).topk(int(recipe.density * t.numel())).indices] = 1
        return t * keep.reshape(t.shape)
    keep = torch.bernoulli(torch.full_like(t, recipe.density), generator=recipe.generator)
    return t * keep / recipe.density


def mix(tensors: list[Tensor], weights: list[float], recipe: Recipe) -> Tensor:
    """Σ w_i T_i of the pruned T_i, or TIES' average of those that agree with the sign."""
    stacked = torch.stack([_prune(t, recipe) for t in tensors])  # (n, *T)
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    w = torch.tensor(weights, dtype=dtype, device=stacked.device)
    weighted = stacked * w.view(-1, *(1,) * (stacked.dim() - 1))
    if recipe.elect is None:
        return weighted.sum(0)
    sign = stacked.sign()
    votes = (stacked if recipe.elect == "total" else sign).sum(0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


# --------------------------------------------------------------------------- per layer
def _elementwise(layer: LoRALayer, parts: list[tuple[str, float]], recipe: Recipe
                 ) -> tuple[Tensor, Tensor]:
    # ΔW = s B A: each side gets √|w s|, A also its sign, so a negative weight subtracts.
    products = [w * layer.scaling[n] for n, w in parts]
    roots = [math.sqrt(abs(p)) for p in products]
    signed = [r * (1 if p >= 0 else -1) for r, p in zip(roots, products)]
    dtype = layer.lora_A[parts[0][0]].dtype
    a = mix([layer.lora_A[n] for n, _ in parts], signed, recipe)
    b = mix([layer.lora_B[n] for n, _ in parts], roots, recipe)
    return a.to(dtype), b.to(dtype)


def groups(layer: LoRALayer) -> int | None:
    """g of ``LoRALayer.delta_blocks``, or None when ΔW is not made of products B A."""
    blocks = layer.delta_blocks(layer.weight.detach())
    return None if blocks is None else blocks.shape[0]


def _blocks(layer: LoRALayer, name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A as (g, r/g, cols) and B as (g, rows, r/g); see ``LoRALayer.delta_blocks``."""
    g = groups(layer) or 1  # checked before: not None
    a, b = layer.lora_A[name].to(dtype), layer.lora_B[name].to(dtype)
    per = layer.rank[name] // g
    return a.reshape(g, per, -1), b.reshape(g, -1, per)


def _cat(layer: LoRALayer, parts: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    dtype = layer.lora_A[parts[0][0]].dtype
    a_blocks, b_blocks = [], []
    for name, weight in parts:
        a, b = _blocks(layer, name, dtype)
        a_blocks.append(a * weight * layer.scaling[name])
        b_blocks.append(b)
    shape_a, shape_b = layer.adapter_shapes(sum(layer.rank[n] for n, _ in parts))
    return torch.cat(a_blocks, 1).reshape(shape_a), torch.cat(b_blocks, 2).reshape(shape_b)


def svd_rank(layer: LoRALayer, rank: int) -> int:
    """``rank`` rounded up to a multiple of the layer's products g, at most its max rank."""
    g = groups(layer) or 1
    return min(g * -(-rank // g), layer.max_rank())


def _svd(layer: LoRALayer, parts: list[tuple[str, float]], recipe: Recipe, rank: int
         ) -> tuple[Tensor, Tensor]:
    # Mixed in the weight's layout (so DARE's masks are PEFT's), factored per block.
    dtype = layer.lora_A[parts[0][0]].dtype
    delta = mix([layer.delta_weight(n) for n, _ in parts], [w for _, w in parts], recipe)
    blocks = layer.delta_blocks(delta)  # (g, rows, cols)
    assert blocks is not None  # checked before
    k = svd_rank(layer, rank)
    per = k // blocks.shape[0]
    u, s, vh = torch.linalg.svd(blocks, full_matrices=recipe.full_matrices,
                                driver=recipe.driver)
    b, a = u[..., :per] * s[..., None, :per], vh[..., :per, :]
    if recipe.clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), recipe.clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    shape_a, shape_b = layer.adapter_shapes(k)
    return a.reshape(shape_a).to(dtype), b.reshape(shape_b).to(dtype)


def combine_layer(layer: LoRALayer, parts: list[tuple[str, float]], recipe: Recipe,
                  rank: int) -> tuple[Tensor, Tensor]:
    """The new adapter's (A, B) on ``layer`` from ``(name, weight)`` parts."""
    with torch.no_grad():
        if recipe.method == "cat":
            a, b = _cat(layer, parts)
        elif recipe.svd:
            a, b = _svd(layer, parts, recipe, rank)
        else:
            a, b = _elementwise(layer, parts, recipe)
    return a.detach().clone(), b.detach().clone()


# --------------------------------------------------------------------------- validation
def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) \
        and math.isfinite(value)


def _check_weights(weights: object) -> list[tuple[str, float]]:
    if not isinstance(weights, Mapping) or not weights or not all(
            isinstance(k, str) and _number(v) for k, v in weights.items()):
        raise ConfigError(
            f"combine_adapters: weights must be a non-empty mapping adapter name -> finite "
            f"number; received {weights!r}. E.g. weights={{'style': 0.7, 'subject': 0.3}}."
        )
    return [(k, float(v)) for k, v in weights.items()]


def _unused(method: str, **given: object) -> list[str]:
    prune, elect, svd = METHODS[method]
    uses = {"density": prune is not None, "majority_sign": elect, "rank": svd,
            "svd_clamp": svd, "svd_driver": svd}
    return [k for k, v in given.items() if v is not None and not uses[k]]


def make_recipe(method: object, *, n: int, density: object, majority_sign: object,
                rank: object, svd_clamp: object, svd_full_matrices: object,
                svd_driver: object, generator: object) -> Recipe:
    """Validate the options of ``combine_adapters``; ``n`` adapters (one is ``linear``)."""
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"combine_adapters: unknown method {method!r}; expected one of "
                          f"{list(METHODS)}.{hint}")
    unused = _unused(str(method), density=density, majority_sign=majority_sign, rank=rank,
                     svd_clamp=svd_clamp, svd_driver=svd_driver)
    if unused:
        raise ConfigError(f"combine_adapters: method {method!r} does not use {unused}; leave "
                          "them out, or pick a method that uses them.")
    prune, elect, svd = METHODS[str(method)]
    low = 0.0 if prune == "magnitude" else 1e-300  # DARE divides by the density
    if prune is not None and not (_number(density) and low <= density <= 1):  # type: ignore[operator]
        raise ConfigError(f"combine_adapters: method {method!r} needs density, the fraction of "
                          f"entries kept, in {'[0' if low == 0 else '(0'}, 1]; received "
                          f"{density!r}. E.g. density=0.5.")
    if elect and majority_sign not in (None, "total", "frequency"):
        raise ConfigError(f"combine_adapters: majority_sign must be 'total' or 'frequency'; "
                          f"received {majority_sign!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"combine_adapters: rank must be a positive int or None (the largest "
                          f"rank of the adapters); received {rank!r}.")
    if svd_clamp is not None and not (_number(svd_clamp) and 0 <= svd_clamp <= 1):  # type: ignore[operator]
        raise ConfigError(f"combine_adapters: svd_clamp must be a quantile in [0, 1] or None; "
                          f"received {svd_clamp!r}.")
    if svd_driver not in _DRIVERS or not isinstance(svd_full_matrices, bool):
        raise ConfigError(f"combine_adapters: svd_driver must be one of {list(_DRIVERS)} (CUDA "
                          f"only) and svd_full_matrices a bool; received {svd_driver!r}, "
                          f"{svd_full_matrices!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"combine_adapters: generator must be a torch.Generator or None; "
                          f"received {generator!r}.")
    if n == 1:  # as in PEFT: one adapter is simply scaled
        prune, elect, svd, method = None, False, False, "linear"
    return Recipe(str(method), prune, str(majority_sign or "total") if elect else None, svd,
                  float(density) if prune else 1.0, rank, svd_clamp,  # type: ignore[arg-type]
                  svd_full_matrices, svd_driver, generator)


def _layer_problems(plan: list[tuple[str, LoRALayer, list[tuple[str, float]]]],
                    recipe: Recipe) -> list[str]:
    problems = []
    for path, layer, parts in plan:
        if recipe.method == "cat" or recipe.svd:
            own = [n for n, _ in parts if tuple(layer.lora_A[n].shape)
                   != tuple(layer.adapter_shapes(layer.rank[n])[0])]
            if groups(layer) is None or own:
                what = (f"adapters {own} are in another layout than its own (PEFT's for a "
                        "grouped convolution), whose ΔW is" if own else "its ΔW is")
                problems.append(
                    f"{path!r} ({type(layer).__name__}): {what} not a product B A that "
                    f"method {recipe.method!r} can concatenate or refactor; use 'linear', "
                    "'ties', 'dare_linear', 'dare_ties' or 'magnitude_prune'.")
        elif len({tuple(layer.lora_A[n].shape) for n, _ in parts}) > 1:
            ranks = {n: layer.rank[n] for n, _ in parts}
            problems.append(
                f"{path!r}: ranks {ranks} differ, and method {recipe.method!r} mixes A and B "
                "entry by entry, so it needs equal ranks; use method='cat' (exact, rank "
                "Σ r) or 'svd' (rank=...).")
    return problems


def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    *,
    method: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Add adapter ``name``, a weighted combination of existing adapters, in place.

    The methods of PEFT's ``add_weighted_adapter``, with its numbers (see the module
    docs for the math): ``"cat"`` (exact: ΔW = Σ w_i ΔW_i, rank Σ r_i), ``"svd"``
    (Σ w_i ΔW_i truncated to ``rank`` by SVD), ``"linear"`` (A and B averaged
    separately; equal ranks), and the pruning methods ``"ties"``, ``"dare_linear"``,
    ``"dare_ties"``, ``"magnitude_prune"`` and their ``"_svd"`` variants. The new
    adapter has scaling 1 (alpha = its rank), the dropout of the first adapter, and is
    an ordinary adapter: inactive until :func:`set_adapter`, trainable, saved, merged
    and deleted like any other. With a single adapter every method is ``"linear"``
    (that adapter times its weight), as in PEFT.

    Args:
        model: a model with LoRA layers; the layers that carry any of the adapters get
            ``name``.
        weights: adapter name -> weight w_i (negative subtracts), in the order used.
        name: the new adapter's name.
        method: one of the methods above.
        rank: SVD methods: the rank k of the result (default: the largest rank of the
            adapters), capped at the rank ΔW can have on each layer.
        density: pruning methods: the fraction of entries kept, in [0, 1] ((0, 1] for
            DARE, which divides by it).
        majority_sign: TIES methods: ``"total"`` (default: sign of Σ T_i) or
            ``"frequency"`` (sign of Σ sign T_i).
        svd_clamp: SVD methods: clip the factors to ± this quantile of their entries.
        svd_full_matrices: SVD methods: passed to ``torch.linalg.svd``.
        svd_driver: SVD methods: passed to ``torch.linalg.svd`` (CUDA only).
        generator: DARE methods: draws the random masks (default: torch's global one).

    Returns:
        The sorted names of the layers that received adapter ``name``.

    Raises:
        ConfigError: a bad weight, name or option; ``name`` exists; ranks differ for an
            entry-by-entry method; or a layer type whose ΔW cannot be refactored.
        AdapterError: a name in ``weights`` is not an adapter of the model.
        StateError: the model has no LoRA layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import loraplug as lp
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> _ = lp.inject_lora(model, target="0", rank=2, name="style")
        >>> _ = lp.inject_lora(model, target="0", rank=4, name="subject")
        >>> lp.combine_adapters(model, {"style": 0.7, "subject": 0.3}, "mix", method="cat")
        ['0']
        >>> model[0].rank["mix"], model[0].scaling["mix"]
        (6, 1.0)
    """
    parts = _check_weights(weights)
    validate_name(name)
    layers = layers_or_raise(model, "combine_adapters")
    check_names(model, [n for n, _ in parts], "combine_adapters")
    recipe = make_recipe(
        method, n=len(parts), density=density, majority_sign=majority_sign, rank=rank,
        svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
        generator=generator)
    taken = [path for path, layer in layers if name in layer.adapter_names]
    if taken:
        raise ConfigError(
            f"combine_adapters: {taken[:5]} already have an adapter named {name!r}; choose "
            f"another name, or delete it first with loraplug.delete_adapter(model, {name!r}).")
    plan = [(path, layer, [(n, w) for n, w in parts if n in layer.rank])
            for path, layer in layers]
    plan = [entry for entry in plan if entry[2]]
    problems = _layer_problems(plan, recipe)
    if problems:
        raise ConfigError("combine_adapters: nothing was changed:\n" + "\n".join(problems))
    top = recipe.rank or max(layer.rank[n] for _, layer, parts in plan for n, _ in parts)
    staged = [(layer, *combine_layer(layer, parts, recipe, top), layer.dropout[parts[0][0]])
              for _, layer, parts in plan]
    for layer, a, b, dropout in staged:
        layer.add_adapter(name, a, b, alpha=a.shape[0], dropout=dropout)  # scaling 1
    return sorted(path for path, _, _ in plan)
