"""The public API is exactly loraplug.__all__: additions are deliberate."""

import inspect
import re
from pathlib import Path

import loraplug as lp

PUBLIC = [
    "AdapterError",
    "AdapterFileError",
    "ConfigError",
    "LayerSummary",
    "LoRAConv",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRAError",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAParameter",
    "LoRAParameterHost",
    "LoRASummary",
    "LoRAWarning",
    "StateError",
    "TargetError",
    "active_adapters",
    "adapter_names",
    "adapter_per_sample",
    "adapter_state_dict",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "inject_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_layer_type",
    "loraplus_param_groups",
    "merge",
    "prepare_for_kbit_training",
    "register_lora_layer",
    "save_adapter",
    "save_merged",
    "set_adapter",
    "summary",
    "unload",
    "unmerge",
]


def test_all_is_pinned_and_sorted() -> None:
    assert lp.__all__ == PUBLIC
    assert sorted(lp.__all__) == lp.__all__


def test_every_public_name_exists_and_is_documented() -> None:
    for name in lp.__all__:
        obj = getattr(lp, name)
        assert obj.__doc__ and obj.__doc__.strip(), name


def test_errors_share_one_base_and_builtin_types() -> None:
    assert all(issubclass(e, lp.LoRAError) for e in (
        lp.ConfigError, lp.TargetError, lp.AdapterError, lp.StateError, lp.AdapterFileError))
    assert issubclass(lp.ConfigError, ValueError) and issubclass(lp.StateError, RuntimeError)
    assert issubclass(lp.AdapterError, LookupError)


def documented_objects() -> list[tuple[str, object]]:
    """The package and every public object, with the methods loraplug defines on classes."""
    found: list[tuple[str, object]] = [("loraplug", lp)]
    for name in lp.__all__:
        obj = getattr(lp, name)
        found.append((name, obj))
        if inspect.isclass(obj):
            found += [(f"{name}.{attr}", value) for attr, value in vars(obj).items()
                      if not attr.startswith("_")
                      and getattr(value, "__module__", "").startswith("loraplug")]
    return found


def test_doctests_sit_under_an_example_heading() -> None:
    """The API page renders a doctest as code only under ``Example:`` (or ``Examples:``)."""
    for name, obj in documented_objects():
        doc = inspect.getdoc(obj) or ""
        if ">>>" in doc:
            before = doc[: doc.index(">>>")]
            assert re.search(r"^Examples?:$", before, re.M), name


def test_api_page_lists_every_public_name_once_in_the_order_of_use() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    names = re.findall(r"^::: loraplug\.(\w+)$", page, re.M)
    assert sorted(names) == lp.__all__  # each once
    assert names[:3] == ["inject_lora", "find_targets", "unload"]
    errors = [n for n in names if isinstance(getattr(lp, n), type)
              and issubclass(getattr(lp, n), (lp.LoRAError, Warning))]
    assert names[-len(errors):] == errors  # errors and warnings come last
    assert re.search(r"^::: loraplug\n    options:\n(      .*\n)*      members: false$", page,
                     re.M)  # the package docstring and its example come first, alone
