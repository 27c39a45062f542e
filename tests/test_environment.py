"""The environment `make` builds is the pinned one: every pin of requirements.txt, torch untouched by the
quantization stack installed beside it."""

import importlib.metadata
import re
from pathlib import Path

import torch

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def pins() -> dict[str, str]:
    found = {}
    for line in REQUIREMENTS.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s#]+)\s*(#.*)?", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_every_pinned_package_is_installed_at_its_pin():
    wrong = {name: (version, importlib.metadata.version(name)) for name, version in pins().items()
             if importlib.metadata.version(name).split("+")[0] != version}
    assert not wrong, f"installed versions differ from requirements.txt (pin, installed): {wrong}"


def test_the_quantization_stack_left_torch_on_its_pinned_build():
    assert {"torch", "torchao", "executorch"} <= set(pins())
    assert torch.__version__.split("+")[0] == pins()["torch"]
