"""The adapter file format: names, keys and readers, shared by saving, loading and the CLI.

An adapter directory holds two files, exactly as PEFT writes them:

- ``adapter_config.json``: ``peft_type``, ``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ... (see ``_peft_config``);
- ``adapter_model.safetensors`` (or a legacy ``adapter_model.bin``): for a layer at
  module path ``<path>``, the tensors ``<path>.lora_A.weight`` (r, in…) and
  ``<path>.lora_B.weight`` (out, r…), or ``<path>.lora_embedding_A`` (r, V) and
  ``<path>.lora_embedding_B`` (d, r) for embeddings; a part of another layer (the
  ``out_proj`` of an attention) is ``<owner>.base_layer.<part>``. Files written by PEFT's
  ``save_pretrained`` (and by ``save_adapter``) put ``base_model.model.`` before every
  key. What PEFT has no field for (the adapter's name, per-layer dropout, the loraplug
  version) is kept in the safetensors metadata under ``loraplug.*``.

Nothing is ever unpickled: ``.bin`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypedDict

import safetensors
import torch
from torch import Tensor, nn

from ._bounded import JSONTooDeep, load_json, tensor_problem
from ._errors import AdapterFileError
from ._layer import LoRALayer
from ._targeting import clean_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
#: PEFT's ``save_pretrained`` puts this before every key (the ``PeftModel`` wrapper).
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = "1"

META_FORMAT = "loraplug.format"
META_VERSION = "loraplug.version"
META_ADAPTER = "loraplug.adapter"
META_DROPOUT = "loraplug.dropout"
#: The config fields that shape the adapter's math, as written beside the tensors, so that
#: a weights file and a config from different saves are caught on load.
META_CONFIG = "loraplug.config"
PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")

#: Key suffix -> (slot, key style); PEFT stores embedding adapters as bare parameters.
#: The DoRA magnitude ("M", PEFT writes it without ``.weight``) and B's bias are optional.
_SUFFIXES = {
    ".lora_A.weight": ("A", "weight"),
    ".lora_B.weight": ("B", "weight"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
    ".lora_magnitude_vector": ("M", "any"),
    ".lora_magnitude_vector.weight": ("M", "any"),
    ".lora_B.bias": ("bias", "weight"),
}
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  #: token rows, under the embedding's path

#: Problems shown in one error message; the rest are counted.
_MAX_LINES = 40

Slots = dict[str, tuple[str, object, str]]  # slot -> (original key, value, key style)


# Key naming.
def key_names(layer_cls: type[LoRALayer]) -> tuple[str, str]:
    """The key suffixes of a layer's A and B, as PEFT names them."""
    # PEFT names an embedding's adapter lora_embedding_A/B; every other layer lora_A/B.weight.
    if layer_cls.peft_key_style == "embedding":
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def key_path(path: str, lora_paths: set[str]) -> str:
    """The module path a layer's keys carry: a part of another LoRA layer (attention's
    ``out_proj``) is ``<owner>.base_layer.<part>``, as PEFT names the children of the
    modules it wraps."""
    owner, _, part = path.rpartition(".")
    return f"{owner}.base_layer.{part}" if owner in lora_paths else path


def part_factor(layers: Mapping[str, LoRALayer], path: str) -> float:
    """What the file's B of the layer at ``path`` is multiplied by to give the layer's B.

    1 except for a part whose owner's layer type says PEFT applies it otherwise (see
    ``LoRAMultiheadAttention.peft_part_factors``).
    """
    owner, _, part = path.rpartition(".")
    if owner not in layers:
        return 1.0
    factors: dict[str, float] = getattr(type(layers[owner]), "peft_part_factors", {})
    return factors.get(part, 1.0)


def index_keys(state: Mapping, names: set[str]) -> tuple[
        dict[str, Slots], dict[str, str], list[str]]:
    """Group LoRA keys by module path; keys may carry PEFT's ``base_model.model.``.

    ``names`` are the model's module names (a model whose own names start with
    ``base_model.model`` keeps the prefix). Returns (path -> slots, other key without
    prefix -> original key, problems).
    """
    problems: list[str] = []
    keys = [k for k in state if isinstance(k, str)]
    problems += [f"key {k!r} is not a string" for k in state if not isinstance(k, str)]
    strip = bool(keys) and all(k.startswith(PEFT_PREFIX) for k in keys) \
        and "base_model.model" not in names
    entries: dict[str, Slots] = defaultdict(dict)
    others: dict[str, str] = {}
    for key in keys:
        short = key[len(PEFT_PREFIX):] if strip else key
        for suffix, (slot, style) in _SUFFIXES.items():
            if short.endswith(suffix) and len(short) > len(suffix):
                path = short[:-len(suffix)]
                if path not in names and ".base_layer." in path:  # see key_path
                    path = path.replace(".base_layer.", ".")
                if slot in entries[path]:
                    problems.append(
                        f"{path}: both {entries[path][slot][0]!r} and {key!r} give its lora_{slot}."
                    )
                entries[path][slot] = (key, state[key], style)
                break
        else:
            others[short] = key
    return dict(entries), others, problems


# Readers.
def locate(path: Path) -> tuple[Path, Path]:
    """(directory, weights file) of the adapter at ``path``: a directory or a file in one.

    Raises:
        AdapterFileError: ``path`` is neither, or the config or weights are missing.
    """
    if path.is_dir():
        for weights_name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            if (path / weights_name).is_file():
                directory, weights = path, path / weights_name
                break
        else:
            raise AdapterFileError(
                f"{path} has neither {WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME}; expected a "
                "directory written by loraplug.save_adapter or PEFT's save_pretrained."
            )
    elif path.is_file() and path.suffix in (".safetensors", ".bin"):
        directory, weights = path.parent, path
    else:
        raise AdapterFileError(
            f"{path} is not an adapter directory (or a .safetensors/.bin file inside one); "
            "pass the directory written by loraplug.save_adapter or PEFT's save_pretrained."
        )
    if not (directory / CONFIG_NAME).is_file():
        raise AdapterFileError(
            f"{directory} has no {CONFIG_NAME}; an adapter directory needs the config beside "
            "its weights (loraplug.save_adapter and PEFT's save_pretrained write both)."
        )
    return directory, weights


def read_config(path: Path) -> object:
    """The parsed JSON at ``path``.

    Raises:
        AdapterFileError: the file is not valid JSON.
    """
    try:
        return load_json(path.read_text(encoding="utf-8"))
    except JSONTooDeep as err:
        raise AdapterFileError(
            f"{path}: {err}; PEFT's LoRA config is a flat object. Save the adapter again, or "
            "repair the file."
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterFileError(
            f"{path} is not valid JSON ({err}); it should hold PEFT's LoRA config. Save the "
            "adapter again, or repair the file."
        ) from err


class UnreadableWeights(Exception):
    """A weights file :func:`read_weights` cannot read; each caller words it for its users.

    ``reason`` says why: ``"safetensors"`` (not a readable safetensors file; ``detail``
    is the reader's error), ``"refused"`` (PyTorch's tensor-only unpickler rejected it;
    ``detail`` names the refused global, or is empty when the bytes are no pickle at
    all), ``"torch"`` (not a readable torch file; ``detail`` is the error) or
    ``"mapping"`` (the file holds no mapping; ``detail`` is the type it holds).
    """

    def __init__(self, path: Path, reason: Literal["safetensors", "refused", "torch", "mapping"],
                 detail: str) -> None:
        super().__init__(f"{path}: {reason} ({detail})")
        self.path, self.reason, self.detail = path, reason, detail


def read_weights(path: Path) -> tuple[Mapping[str, object], dict[str, str]]:
    """(key -> value, metadata) of a ``.safetensors`` file, or of any other file as a
    torch file read with ``weights_only=True`` (no metadata): nothing is unpickled.

    Raises:
        UnreadableWeights: the file cannot be read, or holds no mapping.
    """
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except (safetensors.SafetensorError, OSError) as err:
            raise UnreadableWeights(path, "safetensors", str(err)) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The unpickler names the class it refused ("GLOBAL posix.system"); without that
        # line the bytes are not a pickle at all.
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise UnreadableWeights(path, "refused", detail) from err
    except Exception as err:  # any failure to parse untrusted bytes means "unreadable"
        raise UnreadableWeights(path, "torch", f"{type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping):
        raise UnreadableWeights(path, "mapping", type(state).__name__)
    return state, {}


def read_adapter_weights(path: Path) -> tuple[Mapping[str, object], dict[str, str]]:
    """:func:`read_weights` for an adapter's tensors, with its failures worded for loading.

    Raises:
        AdapterFileError: the file cannot be read, or holds no mapping.
    """
    try:
        return read_weights(path)
    except UnreadableWeights as err:
        if err.reason == "safetensors":
            message = (f"{path} is not a readable safetensors file ({err.detail}); it may be "
                       "truncated or corrupt. Save the adapter again.")
        elif err.reason == "refused":
            message = (
                f"refused to load {path}: PyTorch's tensor-only unpickler rejected it"
                f"{' (' + err.detail + ')' if err.detail else ''}. A pickle holding anything "
                "but tensors can run arbitrary code when loaded, so it was not unpickled. If "
                "you trust the file, convert it to safetensors yourself.")
        elif err.reason == "torch":
            message = f"{path} is not a readable torch file ({err.detail})."
        else:
            message = f"{path} holds a {err.detail}; expected a dict key -> tensor."
        raise AdapterFileError(message) from err.__cause__


class FileExtras(TypedDict, total=False):
    """What loraplug's metadata adds to PEFT's files; a PEFT file has none of it."""

    loraplug: bool
    adapter: str
    dropout: dict[str, float]


def read_metadata(metadata: dict[str, str]) -> tuple[FileExtras, list[str]]:
    """loraplug's extras in a weights file's metadata, and the problems found in them."""
    extras: FileExtras = {}
    problems: list[str] = []
    if META_FORMAT not in metadata:
        return extras, problems
    extras["loraplug"] = True
    if metadata[META_FORMAT] != FORMAT_VERSION:
        problems.append(
            f"the weights were written in loraplug file format {metadata[META_FORMAT]!r} "
            f"(loraplug {metadata.get(META_VERSION, '?')}); this version reads format "
            f"{FORMAT_VERSION!r}. Upgrade loraplug."
        )
    if META_ADAPTER in metadata:
        extras["adapter"] = metadata[META_ADAPTER]
    if META_DROPOUT in metadata:
        try:
            dropout = load_json(metadata[META_DROPOUT])
            ok = isinstance(dropout, dict) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                for v in dropout.values())
        except ValueError:
            ok = False
        if ok:
            extras["dropout"] = dropout
        else:
            problems.append(
                f"metadata {META_DROPOUT} is {metadata[META_DROPOUT]!r}; expected a JSON "
                "object of dropout probabilities in [0, 1)."
            )
    return extras, problems


def pair_problems(raw: object, metadata: dict[str, str]) -> list[str]:
    """Config fields that disagree with those saved beside the tensors.

    Either the save was interrupted between its two renames, or the config was edited
    by hand (which may be deliberate: a warning, not an error).
    """
    if META_CONFIG not in metadata or not isinstance(raw, dict):
        return []
    try:
        saved = load_json(metadata[META_CONFIG])
    except ValueError as err:
        return [f"metadata {META_CONFIG} is not usable JSON ({err}); save the adapter again."]
    differ = [k for k in PAIRED_FIELDS if isinstance(saved, dict) and saved.get(k) != raw.get(k)]
    if not differ:
        return []
    details = ", ".join(
        f"{k} is {raw.get(k)!r} in the config but was {saved.get(k)!r} when the weights were "
        "written" for k in differ
    )
    return [
        f"{CONFIG_NAME} and the weights come from different saves (an interrupted save, or an "
        f"edited config): {details}. The config was used; if it was not edited on purpose, "
        "save the adapter again."
    ]


# What the keys hold.
def layer_tensors(path: str, layer_cls: type[LoRALayer], slots: Slots) -> tuple[
        tuple[Tensor, Tensor] | None, list[str]]:
    """The (A, B) tensors of one layer, or the reasons they are unusable."""
    problems: list[str] = []
    names = dict(zip("AB", key_names(layer_cls)))
    found: dict[str, Tensor] = {}
    for slot in "AB":
        if slot not in slots:
            problems.append(f"{path}: missing key {path}.{names[slot]}.")
            continue
        key, value, found_style = slots[slot]
        if found_style != layer_cls.peft_key_style:
            problems.append(
                f"{path}: key {key!r} is the wrong kind for a {layer_cls.__name__}, whose "
                f"tensors are named {path}.{names['A']} and {path}.{names['B']} (PEFT's names)."
            )
        elif why := tensor_problem(key, value):
            problems.append(f"{path}: {why}")
        else:
            found[slot] = value  # type: ignore[assignment]
    if problems:
        return None, problems
    return (found["A"], found["B"]), []


def extra_tensors(path: str, slots: Slots) -> tuple[dict[str, Tensor], list[str]]:
    """A layer's optional tensors: the DoRA magnitude ("M") and B's bias ("bias")."""
    found: dict[str, Tensor] = {}
    problems = []
    for slot in ("M", "bias"):
        if slot in slots:
            key, value, _ = slots[slot]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                problems.append(f"{path}: {key!r} is not a float tensor.")
            else:
                found[slot] = value
    return found, problems
def fitted_tensors(path: str, probe: LoRALayer, got: tuple[Tensor, Tensor], rank: int,
                   source: str) -> tuple[tuple[Tensor, Tensor] | None, str | None]:
    """The file's (A, B) in a layout ``probe`` computes, or the reason they fit none."""
    fitted = probe.file_tensors(*got, rank)
    if fitted is not None:
        return fitted, None
    want_a, want_b = probe.adapter_shapes(rank)
    a, b = tuple(got[0].shape), tuple(got[1].shape)
    message = (f"{path}: A {a} and B {b} in the file, but rank {rank} (from {source}) needs "
               f"A {tuple(want_a)} and B {tuple(want_b)}")
    if a and probe.file_tensors(*got, a[0]) is not None:
        return None, message + (f"; the tensors have rank {a[0]}, so {source} in "
                                f"{CONFIG_NAME} disagrees with the weights.")
    return None, message + "; the file was saved for a layer of another shape."


def report(where: str, problems: list[str]) -> str:
    """One error message: ``where``, then each problem on its own line (the first 40)."""
    shown = problems[:_MAX_LINES]
    lines = [f"{where}; nothing was changed:", *(f"  - {p}" for p in shown)]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def _hint(key: str) -> str:
    if ".lora_B." in key and key.endswith(".bias"):
        return ("B's bias of an adapter saved with PEFT's lora_bias=true, under a "
                "model.state_dict() name (with the adapter's name); export with "
                "loraplug.adapter_state_dict(model, name) instead")
    if ".lora_magnitude_vector." in key:
        return ("a DoRA magnitude under a model.state_dict() name (with the adapter's name); "
                "export with loraplug.adapter_state_dict(model, name) instead")
    if ".lora_A." in key or ".lora_B." in key:
        return ("it names an adapter inside the key, as model.state_dict() does; export "
                "with loraplug.adapter_state_dict(model, name) instead")
    if ".modules_to_save." in key or key.endswith((".weight", ".bias")):
        return "a full module weight or bias, which a LoRA adapter does not carry"
    return "not a LoRA tensor (expected …lora_A.weight, …lora_B.weight, …lora_embedding_A/B)"


def other_key_problems(model: nn.Module, state: Mapping, others: dict[str, str]) -> list[str]:
    """Problems with keys that are not LoRA tensors.

    PEFT also saves the base weights of targeted (or resized) embedding layers, as
    ``<path>.base_layer.weight``. Such a key is accepted when it equals the model's own
    tensor, since loading it would change nothing; any other key is a problem.
    """
    if not others:
        return []
    model_tensors = {clean_name(k): v for k, v in model.state_dict().items()}
    problems: list[str] = []
    for short, key in others.items():
        own = short.replace(".base_layer.", ".") if ".base_layer." in short else short
        mine, theirs = model_tensors.get(own), state[key]
        if mine is None or not isinstance(theirs, Tensor):
            problems.append(f"unexpected key {key!r}: {_hint(short)}.")
        elif why := tensor_problem(key, theirs):
            problems.append(f"{why.rstrip('.')} ({_hint(short)}).")
        elif theirs.shape != mine.shape or not torch.equal(theirs.to(mine.dtype), mine.cpu()):
            problems.append(
                f"{key!r} holds a base weight for {own} (PEFT saves embedding layers that are "
                f"targeted or resized) with shape {tuple(theirs.shape)}, and it differs from the "
                f"model's {own} {tuple(mine.shape)}: the adapter was trained on other base "
                f"weights. Load them first, e.g. model.load_state_dict({{{own!r}: tensor}}, "
                "strict=False), then the adapter."
            )
    return problems
