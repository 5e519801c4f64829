"""The one device rule (qdiablo.devices): auto is the CPU here (no GPU), a named CUDA device that
is not there is one clear error, and the CPU keeps float32."""

import argparse

import pytest
import torch

from qdiablo.devices import add_device_argument, default_compute_dtype, resolve_device
from qdiablo.errors import UserError


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert default_compute_dtype(torch.device("cpu")) == torch.float32


def test_auto_takes_this_processs_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "tpu", "not-a-device"])
def test_a_device_that_is_not_there_is_one_line(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device"):
        resolve_device(name)


def test_the_flag_defaults_to_auto():
    p = argparse.ArgumentParser()
    add_device_argument(p)
    assert p.parse_args([]).device == "auto"
    assert p.parse_args(["--device", "cpu"]).device == "cpu"
