"""Layer types of optional packages, registered by class name and resolved on first use."""

import sys
import textwrap

import torch
from torch import nn

import loraplug as lp
from loraplug import _registry


def test_type_registered_by_name_resolves_when_a_model_holds_it(tmp_path, monkeypatch):
    # A stand-in "optional package" whose Linear subclass needs its own layer type, and the
    # module that registers that layer when imported.
    (tmp_path / "optpkg.py").write_text("from torch import nn\nclass Dense(nn.Linear):\n    pass\n")
    (tmp_path / "optpkg_lora.py").write_text(textwrap.dedent("""
        import loraplug as lp
        import optpkg
        @lp.register_lora_layer(optpkg.Dense)
        class LoRADense(lp.LoRALinear):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_registry, "_BY_NAME", {})
    _registry.register_by_name("optpkg.Dense", "optpkg_lora")
    assert "optpkg.Dense" in _registry.supported_types()
    import optpkg

    assert "optpkg_lora" not in sys.modules  # nothing imported before a model needs it
    model = nn.Sequential(optpkg.Dense(4, 3))
    assert lp.inject_lora(model, target=nn.Linear, rank=2) == ["0"]
    assert type(model[0]).__name__ == "LoRADense"
    assert "optpkg_lora" in sys.modules
    x = torch.randn(2, 4)
    assert torch.equal(model(x), model[0].base_layer(x))
    _registry._REGISTRY.pop(optpkg.Dense)
