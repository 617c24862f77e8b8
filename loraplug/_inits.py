"""Initial values of A and B: the starting point of training, as PEFT computes them.

Every built-in layer type writes its update as one product over the weight's matrix form:

    ΔW = s · B A,    B (m, r), A (r, n),    W (m, n)

(Linear: W itself; Conv, grouped ones too: W viewed (out, in/groups·k…); Embedding: Wᵀ,
because its ΔW is (B A)ᵀ; see ``_matrix``). The initialisations work on that form:

- ``kaiming`` (PEFT's ``True``), ``gaussian``: one factor random, the other zero, so ΔW = 0
  exactly and the base is untouched.
- ``orthogonal``: A and B both random, built from the odd and even rows of one random
  orthogonal matrix, so B A = 0 up to rounding (datta0.github.io/posts/rethink-lora-init);
  the base is untouched. Needs an even rank.
- ``olora`` (Büyükakyüz, 2024): W = Q R; B = Q[:, :r], A = R[:r]. **Rewrites the base**
  to W − s·B A, so the adapted model starts equal to the base model.
- ``pissa`` (Meng et al., 2024): W_g = U S Vᵀ; B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ. **Rewrites
  the base** to W − s·B A. ``pissa_niter_<k>`` uses a randomized SVD with k subspace
  iterations (faster on large layers; a different residual each run).

An initialisation that rewrites the base leaves A₀, B₀ on the layer (on the CPU), so
that :func:`loraplug.save_adapter` can write the trained adapter as a plain one against
the original weights: ``s·B A − s·B₀ A₀ = s·[B, −B₀] [A; A₀]``, rank 2r.
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import Tensor, nn

from ._adapters import tied_listing
from ._distributed import refuse_sharded
from ._errors import ConfigError, LoRAWarning, StateError
from ._layer import LoRALayer
from ._matrix import form_problem, matrix_shape, transposed, weight_matrix
from ._targeting import clean_name

#: Initialisations that rewrite the base weight when the adapter is created.
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
INITS = ("kaiming", "gaussian", "orthogonal", "olora", "pissa", "pissa_niter_<k>")


def check_init(init: object) -> str:
    """``init`` if it names an initialisation, else a :class:`ConfigError`."""
    if isinstance(init, str) and (init in INITS[:-1] or _PISSA_NITER.fullmatch(init)):
        return init
    raise ConfigError(
        f"init must be one of {list(INITS)} (k a positive number of subspace iterations, e.g. "
        f"'pissa_niter_4'); received {init!r}."
    )


def rewrites_base(init: str) -> bool:
    """Whether ``init`` changes the base weight (``olora``, ``pissa``, ``pissa_niter_<k>``)."""
    return init in ("olora", "pissa") or init.startswith("pissa_niter_")


def _problem(layer: LoRALayer, init: str, rank: int) -> str | None:
    m, n = matrix_shape(layer)
    if form_problem(layer, rank):
        return (f"init={init!r} needs ΔW written as B A on the weight's rows and columns, which "
                f"{type(layer).__name__} does not declare; use init='kaiming' or 'gaussian'.")
    if init == "orthogonal" and rank % 2:
        return (f"init='orthogonal' pairs rows of an orthogonal matrix, so it needs an even "
                f"rank; received rank={rank}. Use an even rank.")
    if rewrites_base(init) and rank > min(m, n):
        return (f"init={init!r} takes the first r singular directions of a {m}×{n} weight, so "
                f"the rank can be at most {min(m, n)}; received rank={rank}.")
    return None


def init_problem(layer: LoRALayer, init: str, rank: int) -> str | None:
    """Why ``init`` cannot start an adapter of ``rank`` on ``layer``, or ``None``."""
    if init in ("kaiming", "gaussian"):
        return None
    return _problem(layer, init, rank)


def _factors(w: Tensor, init: str, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    # w (m, n) -> B (m, rank), A (rank, n).
    m, n = w.shape
    if init == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(rank, rank, dtype=w.dtype))
        a = (torch.randn(n, rank // 2, dtype=w.dtype) @ q[0::2]).t() / 10.0
        b = torch.randn(rank // 2, m, dtype=w.dtype).t() @ q[1::2] / 10.0
        return b, a  # q's odd rows ⟂ even rows: B A = 0 up to rounding
    if init == "olora":
        q, r = torch.linalg.qr(w)
        return q[:, :rank], r[:rank]
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:  # pissa_niter_<k>
        niter = int(init.rsplit("_", 1)[1])
        u, s, v = torch.svd_lowrank(w, q=rank, niter=niter)
        vh = v.t()
    root = (s / scaling).sqrt()
    return u * root, root[:, None] * vh


def zero_start(layer: LoRALayer, rank: int, init: str) -> tuple[Tensor, Tensor]:
    # kaiming: the non-zero side Kaiming-uniform with a = √5 (PEFT's and loralib's
    # default); gaussian: N(0, 1/r). Embeddings start with A = 0 and B ~ N(0, 1), as PEFT.
    weight = layer.weight
    shape_a, shape_b = layer.adapter_shapes(rank)
    a = torch.empty(shape_a, device=weight.device, dtype=torch.float32)
    b = torch.empty(shape_b, device=weight.device, dtype=torch.float32)
    zero, other = (b, a) if layer.zero_init == "B" else (a, b)
    nn.init.zeros_(zero)
    if layer.zero_init == "A":
        nn.init.normal_(other)
    elif init == "kaiming":
        nn.init.kaiming_uniform_(other, a=math.sqrt(5))
    else:
        nn.init.normal_(other, std=1.0 / rank)
    dtype = weight.dtype if weight.is_floating_point() else torch.float32  # packed weights
    return a.to(dtype), b.to(dtype)


def initial_adapter(layer: LoRALayer, rank: int, scaling: float, init: str) -> tuple[
        Tensor, Tensor, Tensor | None]:
    """(A, B, new base weight or ``None``) for a fresh adapter; nothing is changed.

    ``init`` must be valid for the layer (:func:`init_problem`). A and B come in the
    weight's dtype; the new weight, for inits that rewrite the base, is ``W − s·B A``
    computed in :func:`compute_dtype` and cast once.
    """
    if init in ("kaiming", "gaussian"):
        a, b = zero_start(layer, rank, init)
        return a, b, None
    weight = layer.weight
    mat = weight_matrix(layer, weight)
    b_mat, a_mat = _factors(mat, init, rank, scaling)  # (m, r), (r, n)
    shape_a, shape_b = layer.adapter_shapes(rank)
    a = a_mat.reshape(shape_a).to(weight.dtype)
    b = b_mat.reshape(shape_b).to(weight.dtype)
    if not rewrites_base(init):
        return a, b, None
    # W − s·B A, from the factors as stored (in the weight's dtype), so that the adapted
    # model starts as close to the base as the dtype allows.
    residual = mat - scaling * (b.to(mat.dtype).reshape(b_mat.shape)
                                @ a.to(mat.dtype).reshape(a_mat.shape))
    if transposed(layer):
        residual = residual.t()
    return a, b, residual.reshape(weight.shape).to(weight.dtype).contiguous()


def _tied(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[str]]:
    # Module name -> the other modules holding the same weight Parameter.
    found = {}
    for name, module in modules.items():
        weight = module._parameters.get("weight")
        others = [clean_name(n) for n, m in model.named_modules() if m is not module and any(
            p is weight for p in m._parameters.values())] if weight is not None else []
        if others:
            found[name] = others
    return found


def refuse_rewrite(model: nn.Module, modules: dict[str, nn.Module], init: str) -> None:
    """Raise unless the base weights of ``modules`` can be rewritten by ``init``."""
    action = f"inject_lora(init={init!r})"
    refuse_sharded(list(modules.items()), action)
    tied = _tied(model, modules)
    if tied:
        listing = tied_listing(tied)
        raise StateError(
            f"{action} rewrites the base weight to W − s·B₀A₀, but the weight of {listing} is "
            "shared (tied), so the other modules would change too; nothing was changed. Use "
            "init='kaiming', 'gaussian' or 'orthogonal' there, or untie the weights first."
        )
    crowded = [n for n, m in modules.items() if isinstance(m, LoRALayer) and m.adapter_names]
    if crowded:
        warnings.warn(
            f"{action} rewrites the base weight of {crowded[:5]}, which carry other adapters: "
            "those now act on the residual W − s·B₀A₀, not on the original weight.",
            LoRAWarning, stacklevel=5,
        )


def plain_tensors(a: Tensor, b: Tensor, a0: Tensor, b0: Tensor) -> tuple[Tensor, Tensor]:
    """The trained adapter as a plain one against the original base: ``[A; A₀]``, ``[B, −B₀]``.

    ``s·B A − s·B₀ A₀`` is one adapter of rank 2r whose scaling must stay ``s``: the
    caller doubles alpha (or multiplies it by √2 with rsLoRA). A (r, …) and B (out, r, …)
    of any layer type: A's rows and B's columns are concatenated.
    """
    return torch.cat([a, a0.to(a.dtype)]), torch.cat([b, -b0.to(b.dtype)], dim=1)
