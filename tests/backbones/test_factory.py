"""Backbones load the weights they are given, and say plainly when they cannot."""
from __future__ import annotations

import textwrap

import pytest
import timm
import torch
from safetensors.torch import save_file

from transferkit.backbones import factory
from transferkit.errors import BackboneError


def _saved_backbone(tmp_path, name="test_resnet", fmt="safetensors"):
    torch.manual_seed(123)
    src = timm.create_model(name, num_classes=1000)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return sd, path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_file_is_loaded_exactly_and_the_head_replaced(tmp_path, fmt):
    sd, path = _saved_backbone(tmp_path, fmt=fmt)
    model, dc = factory.create("test_resnet", num_classes=3, weights=path)
    got = model.state_dict()
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(got[k], v), k
    assert model.fc.out_features == 3
    assert dc.input_size[0] == 3 and dc.crop_pct > 0


def test_plugin_registers_a_model_whose_pretrained_file_loads(tmp_path):
    sd, path = _saved_backbone(tmp_path)
    plugin = tmp_path / "my_models.py"
    plugin.write_text(textwrap.dedent(f"""
        from timm.models import generate_default_cfgs, register_model
        from timm.models.resnet import BasicBlock, Bottleneck, _create_resnet

        default_cfgs = generate_default_cfgs({{
            "plugin_resnet.local": {{"file": {str(path)!r}, "num_classes": 1000,
                                     "input_size": (3, 48, 48), "crop_pct": 1.0,
                                     "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                     "interpolation": "bicubic", "classifier": "fc"}},
        }})

        @register_model
        def plugin_resnet(pretrained=False, **kwargs):
            args = dict(block=[BasicBlock, BasicBlock, Bottleneck, BasicBlock], layers=(1, 1, 1, 1), stem_width=16, stem_type="deep",
                        avg_down=True, channels=(32, 48, 48, 96))
            return _create_resnet("plugin_resnet", pretrained, **dict(args, **kwargs))
    """))
    ref = timm.create_model("test_resnet")
    if ref.state_dict().keys() != sd.keys():
        pytest.skip("test_resnet's layout changed in this timm version")
    model, dc = factory.create("plugin_resnet", num_classes=4, plugin=plugin)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith("fc."))
    assert dc.input_size == (3, 48, 48) and dc.mean == (0.5, 0.5, 0.5) and dc.interpolation == "bicubic"


def test_image_size_overrides_the_pretrained_size(tmp_path):
    _, path = _saved_backbone(tmp_path)
    _, dc = factory.create("test_resnet", num_classes=2, weights=path, image_size=64)
    assert dc.input_size == (3, 64, 64)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5O'.*did you mean .*resnet50"):
        factory.create("resnet5O", num_classes=2)


def test_missing_pretrained_weights_name_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as err:
        factory.create("test_resnet", num_classes=2)
    msg = str(err.value)
    assert "could not be loaded" in msg and "--weights" in msg and "--no-pretrained" in msg
    assert "\n" not in msg


def test_model_without_pretrained_weights_never_trains_silently_from_random():
    from timm.models import register_model

    @register_model
    def tk_nosource_net(pretrained=False, **kwargs):  # a pretrained config that names no source
        return timm.create_model("test_resnet", pretrained=False, **kwargs)

    with pytest.raises(BackboneError, match="has no pretrained weights.*--weights.*--no-pretrained"):
        factory.create("tk_nosource_net", num_classes=2)


def test_weights_that_do_not_fit_name_the_first_mismatching_tensors(tmp_path):
    src = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match=r"does not fit backbone test_resnet .*(missing|mismatch)"):
        factory.create("test_resnet", num_classes=3, weights=path)


def test_pickled_weights_file_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _Evil()}, path)
    with pytest.raises(BackboneError, match="cannot be read safely"):
        factory.create("test_resnet", num_classes=3, weights=path)


class _Evil:
    pass


@pytest.mark.real
def test_shared_mobilenet_plugin_loads_its_real_weights(shared):
    from safetensors.torch import load_file

    weights = shared / "weights" / "mobilenetv1_025_in1k.safetensors"
    model, dc = factory.create("mobilenetv1_025", num_classes=2, plugin=shared / "weights" / "mobilenetv1_025.py")
    ref = load_file(str(weights))
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items() if not k.startswith("classifier."))
    assert dc.input_size == (3, 224, 224) and dc.crop_pct == 0.875


def test_timm_local_dir_prefix_loads_the_folder_s_weights(tmp_path):
    from timm.models._hub import save_for_hf

    source = timm.create_model("test_resnet", num_classes=5)
    save_for_hf(source, tmp_path / "folder")
    model, _ = factory.create(f"local-dir:{tmp_path / 'folder'}", 3, pretrained=True)
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    assert model.get_classifier().out_features == 3
    with pytest.raises(BackboneError, match="is not a folder"):
        factory.create(f"local-dir:{tmp_path / 'nothing'}", 3)


def test_stochastic_depth_and_dropout_act_in_training_only_and_a_model_without_it_is_refused():
    import torch

    from transferkit.backbones.factory import create
    from transferkit.errors import ConfigError

    x = torch.randn(2, 3, 32, 32)
    for kwargs in ({"drop_path_rate": 0.5}, {"drop_rate": 0.5}):
        torch.manual_seed(0)
        model, _ = create("test_resnet", 3, pretrained=False, quiet=True, **kwargs)
        torch.nn.init.normal_(model.get_classifier().weight)  # a new head starts near zero
        for m in model.modules():  # timm zero-initialises each residual branch's last BatchNorm
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
        model.train()
        with torch.no_grad():
            assert not torch.allclose(model(x), model(x)), kwargs  # a new mask each pass
            model.eval()
            assert torch.equal(model(x), model(x)), kwargs
    with pytest.raises(ConfigError, match=r"--drop-path 0.1: dla34 has no stochastic depth"):
        create("dla34", 3, pretrained=False, quiet=True, drop_path_rate=0.1)
