"""loraplug: LoRA adapters for PyTorch's Linear, Conv1d/2d/3d and Embedding layers.

Put adapters into a model, train them, merge them, save them as PEFT-format files.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import loraplug as lp
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> lp.inject_lora(model, target=nn.Linear, rank=4)
    ['0', '2']
    >>> lp.merge(model)
    >>> _ = lp.unload(model)
"""

from . import _quantized  # noqa: F401  (registers the quantized layer types by name)
from ._adapters import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disable_adapters,
    set_adapter,
)
from ._combine import combine_adapters
from ._conv import LoRAConv, LoRAConv1d, LoRAConv2d, LoRAConv3d
from ._embedding import LoRAEmbedding
from ._errors import (
    AdapterError,
    AdapterFileError,
    ConfigError,
    LoRAError,
    LoRAWarning,
    StateError,
    TargetError,
)
from ._inject import inject_lora, unload
from ._kbit import prepare_for_kbit_training
from ._layer import LoRALayer
from ._linear import LoRALinear
from ._load import load_adapter, load_adapter_state_dict
from ._loraplus import loraplus_param_groups
from ._merging import merge, unmerge
from ._mha import LoRAMultiheadAttention
from ._mixed import adapter_per_sample
from ._parameter import LoRAParameter, LoRAParameterHost
from ._registry import lora_layer_type, register_by_name, register_lora_layer
from ._save import adapter_state_dict, save_adapter, save_merged
from ._summary import LayerSummary, LoRASummary, summary
from ._targeting import find_targets
from ._version import VERSION

# Layer types of optional packages: imported when a model holds one.
register_by_name("transformers.pytorch_utils.Conv1D", "loraplug._conv1d")

__version__ = VERSION

__all__ = [
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
