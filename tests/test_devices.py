"""The one device resolver: ``auto``, explicit devices, and devices this machine does not have."""

from __future__ import annotations

import pytest
import torch

from cpp.devices import resolve_device
from cpp.errors import OptionError


def test_auto_and_explicit_devices() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_devices_that_are_not_here_are_option_errors() -> None:
    with pytest.raises(OptionError, match=r"^device 'tpu': use 'auto', 'cpu' or 'cuda\[:N\]'$"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match=r"^device 'cuda:0': CUDA is not available here"):
            resolve_device("cuda:0")
    else:
        count = torch.cuda.device_count()
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(OptionError, match=f"this machine has {count} CUDA device"):
            resolve_device(f"cuda:{count}")
