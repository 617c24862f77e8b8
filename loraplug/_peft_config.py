"""PEFT's ``adapter_config.json`` for LoRA: read with PEFT's own rules, written exactly.

Reading follows PEFT's semantics field by field, so an adapter means the same thing here
as in PEFT:

- ``target_modules`` as a list names a module when it equals the module's full name or
  ends with ``"." + entry``; as a string it is a regex matched with ``re.fullmatch``
  (``exclude_modules`` likewise).
- ``rank_pattern`` / ``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds gives the layer's rank / alpha;
  other layers use ``r`` / ``lora_alpha``.
- scaling is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.

Fields that would change the math and have no equivalent here (DoRA, bias training,
``modules_to_save``, base-modifying initialisations, ...) are refused by name rather than
ignored. Writing produces the fields PEFT needs and nothing of our own: extras live in
the safetensors metadata.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

from ._bounded import ALPHA_RANGE, MAX_RANK, alpha_ok, finite_number, rank_ok
from ._options import AdapterOptions
from ._peft_regex import fullmatcher, key_finder
from ._regex import RegexRefused

_RANK_TEXT = f"a positive integer, at most {MAX_RANK}"
_ALPHA_TEXT = (f"a finite number > 0, within float32's range {ALPHA_RANGE[0]:.4g} to "
               f"{ALPHA_RANGE[1]:.4g}")

#: Fields that must hold a neutral value, with the reason they cannot be honoured.
_REFUSED: dict[str, tuple[tuple[object, ...], str]] = {
    "bias": (("none", None), (
        "bias='all' or 'lora_only' files carry trained base biases; loraplug adapters hold "
        "only A and B")),
    "layer_replication": ((None,), "layer_replication changes the model's layers"),
    "use_qalora": ((False, None), "QALoRA is not supported"),
    "alora_invocation_tokens": ((None,), "activated LoRA (aLoRA) is not supported"),
    "arrow_config": ((None,), "Arrow routing is not supported"),
    "monteclora_config": ((None,), "MonteCLoRA is not supported"),
    "kasa_config": ((None,), "KaSA is not supported"),
    "velora_config": ((None,), "VeLoRA is not supported"),
    "use_bdlora": ((None, False), "BD-LoRA is not supported"),
    "megatron_config": ((None,), "Megatron-parallel layers are not supported"),
    "ensure_weight_tying": ((False, None), (
        "ensure_weight_tying=true shares one adapter between tied layers, which loraplug "
        "does not do")),
}

#: Fields read elsewhere or with no effect on the adapted function.
_IGNORED = frozenset({
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
    "exclude_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "task_type", "auto_mapping", "peft_version",
    "base_model_name_or_path", "revision", "inference_mode", "runtime_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
    "target_parameters",
    # PEFT sets it for transformers' Conv1D (weight stored (in, out)) and clears it for
    # Linear, layer by layer, whatever the file says; A and B have Linear's shapes both ways.
    "fan_in_fan_out",
})

#: PEFT's ``init_lora_weights`` -> the ``init`` a loaded adapter is injected with. Those
#: that only choose starting values (the file's tensors replace them) load as plain
#: adapters; ``pissa`` and ``olora`` rewrite the base weight, which loading redoes from the
#: original weights exactly as PEFT does (SVD and QR are deterministic).
_INITS: dict[object, str] = {True: "kaiming", False: "kaiming", "gaussian": "kaiming",
                             "eva": "kaiming", "mica": "kaiming", "orthogonal": "kaiming",
                             "pissa": "pissa", "olora": "olora"}
#: Initialisations that rewrite the base weights from something the file does not carry.
_UNREBUILDABLE = {
    "corda": "from the activations of calibration data (CorDA)",
    "loftq": "to a quantised weight and its residual (LoftQ)",
    "lora_ga": "from gradients estimated on training data (LoRA-GA)",
}

T = TypeVar("T")

#: PEFT's shorthand for "every linear layer but the output layer"; PEFT expands it
#: before saving, so a file holding it names its layers through its tensor keys.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class PeftLoRAConfig:
    """What an ``adapter_config.json`` says about a LoRA adapter, validated."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    #: ``layers_to_transform`` narrows the targets to some layer indices; then the
    #: tensor keys, not ``target_modules`` alone, say which layers exist.
    layers_restricted: bool = False
    init: str = "kaiming"
    dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] | None = None
    #: ``{embedding name: token ids}``, or a list of ids for the input embedding.
    token_indices: dict[str, tuple[int, ...]] | tuple[int, ...] | None = None
    #: Bare parameters adapted through the weight (PEFT's rule: full name or "."-suffix).
    target_parameters: tuple[str, ...] = ()

    @property
    def options(self) -> AdapterOptions:
        """How the adapter's layers are made: its initialisation, DoRA, B's bias."""
        return AdapterOptions(self.init, self.dora, self.lora_bias)

    def spec(self, name: str) -> tuple[int, float, str]:
        """(rank, alpha, where the rank came from) for module ``name``, as PEFT resolves it."""
        rank_key = pattern_key(self.rank_pattern, name)
        alpha_key = pattern_key(self.alpha_pattern, name)
        rank = self.rank if rank_key is None else self.rank_pattern[rank_key]
        alpha = self.alpha if alpha_key is None else self.alpha_pattern[alpha_key]
        source = "r" if rank_key is None else f"rank_pattern[{rank_key!r}]"
        return rank, alpha, source

    def names_explicitly(self) -> bool:
        """Whether ``target_modules`` alone says exactly which layers carry the adapter."""
        return self.target_modules not in (None, ALL_LINEAR) and not self.layers_restricted

    def targets(self, name: str) -> bool:
        """Whether PEFT would put this adapter on module ``name``."""
        if self.exclude_modules is not None and matches(self.exclude_modules, name):
            return False
        targets = self.target_modules
        if targets is None or targets == ALL_LINEAR:
            return True
        return matches(targets, name)


def matches(spec: tuple[str, ...] | str, name: str) -> bool:
    """PEFT's ``target_modules`` rule: list = full name or ``.``-suffix; str = fullmatch.

    Regexes run in bounded time (``_regex``), with ``re``'s meaning.
    """
    if isinstance(spec, str):
        return fullmatcher(spec)(name)
    return name in spec or any(name.endswith("." + entry) for entry in spec)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that matches ``name``, PEFT's way
    (``re.match(rf"(.*\\.)?({key})$", name)``), in bounded time."""
    keys = tuple(patterns)
    index = key_finder(keys)(name)
    return None if index is None else keys[index]


def _is_number(value: object) -> TypeGuard[int | float]:
    return finite_number(value)


def _rank_ok(value: object) -> bool:
    return rank_ok(value)


def _regex_problem(field_name: str, pattern: str, *, key: bool = False) -> str | None:
    try:
        key_finder((pattern,)) if key else fullmatcher(pattern)
    except RegexRefused as err:
        where = " once PEFT embeds it as (.*\\.)?(KEY)$" if key else ""
        if err.invalid:
            return f"{field_name} {pattern!r} is not a valid regular expression{where} ({err})."
        return (f"{field_name} {pattern!r} is refused{where}: {err}. Regexes in adapter files "
                "are matched in bounded time, so backreferences, conditional or atomic groups, "
                "possessive quantifiers and very large patterns are not accepted; list the "
                "module names instead.")
    return None


def _module_spec(raw: dict, key: str, problems: list[str]) -> tuple[str, ...] | str | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        why = _regex_problem(key, value) if value != ALL_LINEAR else None
        if why:
            problems.append(why)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    problems.append(f"{key} is {value!r}; expected a list of module names or a regex string.")
    return None


def _positive_number(value: object) -> bool:
    return alpha_ok(value)


def _pattern(raw: dict, key: str, problems: list[str], *, valid: Callable[[object], bool],
             expected: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key} is {value!r}; expected an object mapping name patterns to values.")
        return {}
    for pattern, item in value.items():
        why = _regex_problem(f"{key} key", pattern, key=True)
        if why:
            problems.append(why)
        if not valid(item):
            problems.append(f"{key}[{pattern!r}] is {item!r}; expected {expected}.")
    return dict(value)


def _refused(raw: dict) -> list[str]:
    """The fields whose value would change the math in a way loraplug cannot follow."""
    found = []
    for name, (neutral, why) in _REFUSED.items():
        value = raw.get(name)
        if value not in neutral and value != [] and value != {}:
            found.append(f"{name} is {value!r}: {why}.")
    return found


def parse_config(raw: object) -> tuple[PeftLoRAConfig | None, list[str], list[str]]:
    """Validate a parsed ``adapter_config.json``.

    Returns:
        (config or ``None`` when unusable, problems, unknown fields with a non-neutral value).
    """
    if not isinstance(raw, dict):
        return None, [
            f"the config is a JSON {type(raw).__name__}; expected an object with PEFT's LoRA "
            "fields (peft_type, r, lora_alpha, target_modules, ...)."
        ], []
    problems: list[str] = []
    if raw.get("peft_type") != "LORA":
        problems.append(
            f"peft_type is {raw.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') "
            "can be loaded."
        )
    rank = raw.get("r", 8)
    if not _rank_ok(rank):
        problems.append(f"r is {rank!r}; expected {_RANK_TEXT}.")
    alpha = raw.get("lora_alpha", 8)
    if not _positive_number(alpha):
        problems.append(f"lora_alpha is {alpha!r}; expected {_ALPHA_TEXT}.")
    dropout = raw.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"lora_dropout is {dropout!r}; expected a number in [0, 1).")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora is {use_rslora!r}; expected true or false.")
    rank_pattern = _pattern(raw, "rank_pattern", problems, valid=_rank_ok,
                            expected=_RANK_TEXT)
    alpha_pattern = _pattern(raw, "alpha_pattern", problems, valid=_positive_number,
                             expected=_ALPHA_TEXT)
    targets = _module_spec(raw, "target_modules", problems)
    excludes = _module_spec(raw, "exclude_modules", problems)
    parameters = raw.get("target_parameters") or []
    if not (isinstance(parameters, list) and all(isinstance(p, str) for p in parameters)):
        problems.append(f"target_parameters is {parameters!r}; expected a list of parameter "
                        "names.")
        parameters = []
    init = _init(raw.get("init_lora_weights", True), problems)
    extras = _extras(raw, problems)
    problems += _refused(raw)
    layers = raw.get("layers_to_transform")
    unknown = sorted(
        k for k, v in raw.items()
        if k not in _IGNORED and k not in _REFUSED and v not in (None, False, [], {}, "")
    )
    if problems:
        return None, problems, unknown
    config = PeftLoRAConfig(
        rank=rank, alpha=float(alpha), dropout=float(dropout), use_rslora=use_rslora,
        target_modules=targets, exclude_modules=excludes, rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        layers_restricted=layers not in (None, []), init=init,
        target_parameters=tuple(parameters), **extras,  # type: ignore[arg-type]
    )
    return config, [], unknown


def _init(value: object, problems: list[str]) -> str:
    """The ``init`` to load an adapter of PEFT's ``init_lora_weights`` with."""
    if isinstance(value, (bool, str)) and value in _INITS:
        return _INITS[value]
    if isinstance(value, str) and re.fullmatch(r"pissa_niter_\d+", value):
        problems.append(
            f"init_lora_weights is {value!r}: the adapter was trained on the residual "
            "W − s·B₀A₀ of a randomized SVD, which cannot be rebuilt from the original "
            "weights. Save it as a plain adapter (loraplug: save_adapter(..., plain=True); "
            "PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...)).")
    elif isinstance(value, str) and value in _UNREBUILDABLE:
        problems.append(
            f"init_lora_weights is {value!r}, which rewrites the base weights "
            f"{_UNREBUILDABLE[value]}; the file does not carry that, so the adapter only fits "
            "the rewritten model. Convert it with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)).")
    else:
        problems.append(f"init_lora_weights is {value!r}; expected one of PEFT's "
                        f"initialisations {sorted(map(str, _INITS))} or 'pissa_niter_<k>'.")
    return "kaiming"


def _extras(raw: dict, problems: list[str]) -> dict[str, object]:
    """DoRA, B's bias, trained modules and token rows, as :class:`PeftLoRAConfig` fields."""
    found: dict[str, object] = {}
    for key, field_name in (("use_dora", "dora"), ("lora_bias", "lora_bias")):
        value = raw.get(key) or False
        if not isinstance(value, bool):
            problems.append(f"{key} is {value!r}; expected true or false.")
        found[field_name] = bool(value)
    if found["dora"] and found["lora_bias"]:
        problems.append("use_dora and lora_bias are both true, which PEFT refuses too.")
    saved = raw.get("modules_to_save")
    if saved is not None:
        if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
            problems.append(f"modules_to_save is {saved!r}; expected a list of module names.")
        else:
            found["modules_to_save"] = tuple(saved)
    tokens = raw.get("trainable_token_indices")
    ids_ok = lambda ids: isinstance(ids, list) and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) for i in ids)
    if isinstance(tokens, dict) and all(ids_ok(v) for v in tokens.values()):
        found["token_indices"] = {k: tuple(v) for k, v in tokens.items()}
    elif ids_ok(tokens):
        found["token_indices"] = tuple(tokens)  # type: ignore[arg-type]
    elif tokens is not None:
        problems.append(f"trainable_token_indices is {tokens!r}; expected token ids, or an "
                        "object mapping embedding names to token ids.")
    return found


def _most_common(values: list[T]) -> T:
    return Counter(values).most_common(1)[0][0]


def _overmatches(wanted: set[str], others: Iterable[str]) -> bool:
    # Would PEFT's list rule (full name or "."-suffix) also pick a module not wanted?
    for name in others:
        if name in wanted:
            continue
        if any(name[i + 1:] in wanted for i, ch in enumerate(name) if ch == "."):
            return True
    return False


def build_config(
    layers: dict[str, tuple[int, float, float]], *, use_rslora: bool, all_names: Iterable[str],
    fan_in_fan_out: bool = False, implied: Iterable[str] = (), parameters: Collection[str] = (),
) -> dict[str, object]:
    """The ``adapter_config.json`` for layers ``{name: (rank, alpha, dropout)}``.

    ``fan_in_fan_out`` is true when an adapted layer stores its weight (in, out)
    (transformers' Conv1D), as PEFT writes it for such layers.

    ``r`` and ``lora_alpha`` are the most common values; layers that differ get an
    anchored ``rank_pattern``/``alpha_pattern`` entry (``^`` + escaped name) that matches
    that layer alone. ``implied`` layers (parts adapted with their owner) are left out of
    ``target_modules``, which is the sorted list of the other layer names, or an
    alternation regex when PEFT's suffix rule would also pick other modules of the model.
    The names in ``parameters`` are bare parameters: they go to ``target_parameters``,
    and ``lora_dropout`` is 0 then (PEFT refuses dropout there; per-layer dropout lives
    in the file's metadata).
    """
    names = sorted(layers)
    rank = _most_common([layers[n][0] for n in names])
    alpha = _most_common([layers[n][1] for n in names])
    dropout = 0.0 if parameters else _most_common([layers[n][2] for n in names])
    modules = sorted(n for n in names if n not in parameters and n not in set(implied))
    targets: list[str] | str = modules
    if _overmatches(set(modules), all_names):
        targets = "|".join(re.escape(n) for n in modules)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": targets,
        "exclude_modules": None,
        "rank_pattern": {"^" + re.escape(n): layers[n][0] for n in names
                         if layers[n][0] != rank},
        "alpha_pattern": {"^" + re.escape(n): _json_number(layers[n][1]) for n in names
                          if layers[n][1] != alpha},
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "target_parameters": sorted(parameters) or None,
        "inference_mode": True,
    }


def _json_number(value: float) -> int | float:
    # 16 rather than 16.0, as PEFT writes it; both mean the same to every reader.
    return int(value) if float(value).is_integer() else value
