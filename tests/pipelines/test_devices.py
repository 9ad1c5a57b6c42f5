"""The one device rule: --accelerator is honoured, a missing device is a one-line error."""
from __future__ import annotations

import pytest
import torch

from transferkit.errors import ConfigError
from transferkit.pipelines.devices import choose_device


def test_cpu_is_always_the_cpu_and_auto_takes_a_gpu_only_where_there_is_one():
    assert choose_device("cpu") == torch.device("cpu")
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert choose_device("auto") in (want, torch.device("mps"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_that_is_not_there_says_so():
    with pytest.raises(ConfigError, match="--accelerator gpu: no such device here; use --accelerator cpu or auto"):
        choose_device("gpu")


def test_an_unknown_accelerator_names_the_choices():
    with pytest.raises(ConfigError, match="'tpu' is not known here; use one of auto, cpu, gpu, cuda, mps"):
        choose_device("tpu")
