"""torchvision models built from code with random weights: inject, train, merge, unload."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import assert_close
from torch import nn
from torchvision import models

import loraplug as lp

SLOW = {"vgg19-classifier", "vgg19-every-conv", "vit_b_16-mlp-and-head"}
CASES = {
    "resnet18-all-convs-and-fc": (lambda: models.resnet18(num_classes=10), [nn.Conv2d, "fc"],
                                  {}, (2, 3, 32, 32)),
    # Depthwise convolutions included, at the same rank as the others.
    "mobilenet_v3_small-every-conv": (lambda: models.mobilenet_v3_small(num_classes=10),
                                      [nn.Conv2d], {}, (2, 3, 32, 32)),
    "vit_b_16-mlp-and-head": (lambda: models.vit_b_16(image_size=32, num_classes=10),
                              ["encoder.layers.*.mlp.*", "heads.head"], {},
                              (2, 3, 32, 32)),
    "vgg19-classifier": (lambda: models.vgg19(num_classes=10), ["classifier.*"], {},
                         (2, 3, 32, 32)),
    "vgg19-every-conv": (lambda: models.vgg19(num_classes=10), [nn.Conv2d], {}, (2, 3, 32, 32)),
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES],
    ids=list(CASES),
)
def test_real_model_round_trip(case: str) -> None:
    build, target, extra, shape = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    original_state = copy.deepcopy(model.state_dict())
    base_out = model(x)
    kwargs = {"rank": 4, **extra}
    if case == "vgg19-classifier":  # ReLU/Dropout matched too: parameter-less, not reported
        names = lp.inject_lora(model, target=target, **kwargs)
        assert names == ["classifier.0", "classifier.3", "classifier.6"]
    else:
        names = lp.inject_lora(model, target=target, **kwargs)
    assert names
    assert torch.equal(model(x), base_out)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    # B starts at zero: the first step moves B only; a second step makes ΔW non-zero.
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()
    for k, v in original_state.items():
        if "lora" not in k and "running" not in k and "num_batches" not in k:
            assert torch.equal(model.state_dict()[k], v), k
    adapted = model(x)
    assert (adapted - base_out).abs().max() > 1e-3 * base_out.abs().max()  # training moved it
    lp.merge(model, safe=True)
    scale = max(1.0, adapted.abs().max().item())
    assert_close(model(x), adapted, scale=scale)
    lp.unload(model, merge=False)
    assert not any(isinstance(m, lp.LoRALayer) for m in model.modules())
    assert_close(model(x), base_out, scale=max(1.0, base_out.abs().max().item()))


@pytest.mark.slow
def test_vit_linear_type_target_reaches_attention_out_proj() -> None:
    model = models.vit_b_16(image_size=32, num_classes=10)
    names = lp.inject_lora(model, target=nn.Linear, rank=2)
    assert "heads.head" in names
    assert sum(n.endswith("self_attention.out_proj") for n in names) == 12
    assert type(model.encoder.layers[0].self_attention) is lp.LoRAMultiheadAttention


def test_vit_attention_out_proj_takes_its_adapter_through_the_weight() -> None:
    # nn.MultiheadAttention reads out_proj.weight instead of calling out_proj: it is
    # handed W + ΔW, so the adapter counts and merging changes nothing.
    torch.manual_seed(0)
    model = models.vit_b_16(image_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    names = lp.inject_lora(model, target=nn.Linear, rank=2)
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj" in names
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.default") and "out_proj" in name:
                p.normal_(std=0.05)
        unmerged = model(x)
        lp.merge(model)
        assert_close(model(x), unmerged, scale=max(1.0, unmerged.abs().max().item()))
