"""The public API is exactly loraplug.__all__: additions are deliberate."""

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
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "inject_lora",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_layer_type",
    "merge",
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
