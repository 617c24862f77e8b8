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
from ._peft_regex import fullmatcher, key_finder
from ._regex import RegexRefused

_RANK_TEXT = f"a positive integer, at most {MAX_RANK}"
_ALPHA_TEXT = (f"a finite number > 0, within float32's range {ALPHA_RANGE[0]:.4g} to "
               f"{ALPHA_RANGE[1]:.4g}")

#: Fields that must hold a neutral value, with the reason they cannot be honoured.
_REFUSED: dict[str, tuple[tuple[object, ...], str]] = {
    "use_dora": ((False, None), "DoRA adapters (use_dora=true) are not supported yet"),
    "fan_in_fan_out": ((False, None), (
        "fan_in_fan_out=true is for transformers' Conv1D layers (GPT-2), which have no LoRA "
        "layer here")),
    "bias": (("none", None), (
        "bias='all' or 'lora_only' files carry trained base biases; loraplug adapters hold "
        "only A and B")),
    "lora_bias": ((False, None), "lora_bias=true adds a bias to B, which loraplug lacks"),
    "modules_to_save": ((None,), (
        "modules_to_save stores full copies of modules; load those weights with "
        "model.load_state_dict")),
    "trainable_token_indices": ((None,), "trainable_token_indices is not supported"),
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
    "qalora_group_size", "target_parameters",
})

#: Initialisations that leave the base weights alone (others rewrite W when created).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")

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
    #: Bare parameters adapted through the weight (PEFT's rule: full name or "."-suffix).
    target_parameters: tuple[str, ...] = ()

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
    init = raw.get("init_lora_weights", True)
    if init not in _SAFE_INITS:
        problems.append(
            f"init_lora_weights is {init!r}, an initialisation that rewrites the base weights "
            "when the adapter is created, so the adapter only fits that rewritten model; "
            "convert it with PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))."
        )
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
        layers_restricted=layers not in (None, []),
        target_parameters=tuple(parameters),
    )
    return config, [], unknown


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
    parameters: Collection[str] = (),
) -> dict[str, object]:
    """The ``adapter_config.json`` for layers ``{name: (rank, alpha, dropout)}``.

    ``r`` and ``lora_alpha`` are the most common values; layers that differ get an
    anchored ``rank_pattern``/``alpha_pattern`` entry (``^`` + escaped name) that matches
    that layer alone. ``target_modules`` is the sorted list of layer names, or an
    alternation regex when PEFT's suffix rule would also pick other modules of the model.
    The names in ``parameters`` are bare parameters: they go to ``target_parameters``,
    and ``lora_dropout`` is 0 then (PEFT refuses dropout there; per-layer dropout lives
    in the file's metadata).
    """
    names = sorted(layers)
    rank = _most_common([layers[n][0] for n in names])
    alpha = _most_common([layers[n][1] for n in names])
    dropout = 0.0 if parameters else _most_common([layers[n][2] for n in names])
    modules = [n for n in names if n not in parameters]
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
        "fan_in_fan_out": False,
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
