"""The prediction engine's flags: TTA spec lists and ensemble lists."""
from __future__ import annotations

import pytest

from transferkit.errors import ConfigError
from transferkit.pipelines.evaluate.predictor import parse_ensemble_list, parse_tta_list


def test_tta_lists_keep_multiscale_scales_together():
    assert parse_tta_list("plain,hflip,ten-crop") == ["plain", "hflip", "ten-crop"]
    assert parse_tta_list("hflip,multiscale:0.9,1.0,1.1,plain") == ["plain", "hflip", "multiscale:0.9,1.0,1.1"]
    assert parse_tta_list("hflip+multiscale:0.9,1.1;five-crop") == ["hflip+multiscale:0.9,1.1", "five-crop"]
    assert parse_tta_list(["plain", "plain", "hflip"]) == ["plain", "hflip"]
    with pytest.raises(ConfigError, match=r"stray number '0.9'"):
        parse_tta_list("plain,0.9")
    with pytest.raises(ConfigError, match="unknown TTA view 'sideways'"):
        parse_tta_list("plain,sideways")
    with pytest.raises(ConfigError, match="empty view spec"):
        parse_tta_list("plain,,hflip")
    assert parse_ensemble_list("ema, none,snapshots") == ["none", "ema", "snapshots"]
    with pytest.raises(ConfigError, match="unknown --ensemble 'polyak'"):
        parse_ensemble_list("none,polyak")
