"""What a test worker process hands back to its test: nested dicts/lists of tensors and JSON
values, written as one safetensors file (the tensors) and one JSON file (the structure), so no
test unpickles anything (the project's rule for checkpoints holds for test results too)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_TENSOR, _DICT, _TUPLE = "__tensor__", "__dict__", "__tuple__"


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if torch.is_tensor(obj):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(obj, dict):  # pairs keep int keys ints
        return {_DICT: [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    return obj


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict) and _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if isinstance(obj, dict) and _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if isinstance(obj, dict):
        return {k: _decode(v, tensors) for k, v in obj[_DICT]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_result(result, stem: str | Path) -> None:
    """`result` as STEM.safetensors + STEM.json."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(result, tensors)
    save_file(tensors, f"{stem}.safetensors")
    Path(f"{stem}.json").write_text(json.dumps(structure))


def load_result(stem: str | Path):
    """What save_result(result, STEM) wrote."""
    return _decode(json.loads(Path(f"{stem}.json").read_text()), load_file(f"{stem}.safetensors"))
