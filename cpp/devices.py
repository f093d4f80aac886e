"""The one device resolver: encoders and the head turn a device option into a torch device here."""

from __future__ import annotations

import torch

from cpp.errors import OptionError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else CPU; otherwise the device given, which must exist here
    (an :class:`~cpp.errors.OptionError` of ``device`` when it does not)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise OptionError("device", "use 'auto', 'cpu' or 'cuda[:N]'", value=device) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", "CUDA is not available here; use 'cpu' or 'auto'", value=device)
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise OptionError(
                "device", f"this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}", value=device
            )
    return resolved
