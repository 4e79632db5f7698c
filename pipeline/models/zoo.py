"""torchvision classification architectures as feature extractors (multiview's views).

Each entry of :data:`ZOO` builds a torchvision network with random weights (never a hub
download) and replaces its classifier by the identity, so ``forward`` gives the penultimate
features: the input of the last linear layer. Pretrained weights come from a local path or
``s3://`` URI as safetensors or a weights-only state dict (:func:`load_checked`), found
wherever they sit in the checkpoint (a nested table, a name prefix), with the share of the
network's tensors they fill checked against a threshold. No Ray imports here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline.models.weights import Fit, Tables, WeightsError, fit, log_place

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _fc(net: nn.Module) -> None:
    net.fc = nn.Identity()  # type: ignore[assignment]


def _classifier(net: nn.Module) -> None:
    net.classifier = nn.Identity()  # type: ignore[assignment]


def _last_of_classifier(net: nn.Module) -> None:
    classifier = net.classifier
    assert isinstance(classifier, nn.Sequential)
    classifier[-1] = nn.Identity()


def _heads(net: nn.Module) -> None:
    net.heads = nn.Identity()  # type: ignore[assignment]


@dataclass(frozen=True)
class ZooEntry:
    """An architecture: its torchvision constructor, how its classifier is removed, the
    penultimate feature size, and torchvision's default input (size, ImageNet statistics)."""

    name: str
    strip: Callable[[nn.Module], None]
    dim: int
    size: int = 224
    fixed_size: bool = False  # ViT: the positional embedding fixes the input size


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("resnet18", _fc, 512),
    ZooEntry("resnet34", _fc, 512),
    ZooEntry("resnet50", _fc, 2048),
    ZooEntry("resnet101", _fc, 2048),
    ZooEntry("densenet121", _classifier, 1024),
    ZooEntry("vgg16", _last_of_classifier, 4096),  # fc7, after its ReLU (dropout is off in eval)
    ZooEntry("efficientnet_b0", _classifier, 1280),
    ZooEntry("convnext_tiny", _last_of_classifier, 768),  # after the LayerNorm and flatten
    ZooEntry("vit_b_16", _heads, 768, fixed_size=True),  # the class token
)}


def build(name: str, size: int | None = None) -> nn.Module:
    """The randomly initialised network ``name`` without its classifier: (n, 3, s, s) ->
    (n, ZOO[name].dim). ``size`` matters only for fixed-size architectures (ViT)."""
    from torchvision import models as tvm

    entry = ZOO[name]
    kwargs = {"image_size": size} if entry.fixed_size and size else {}
    net: nn.Module = getattr(tvm, name)(weights=None, **kwargs)
    entry.strip(net)
    return net


def load_checked(net: nn.Module, tables: Tables, name: str, min_coverage: float,
                 table: str | None = None, prefix: str | None = None) -> Fit:
    """Load the tensors of the checkpoint ``tables`` that fit ``net``, from the table and
    name prefix that fill most of it (:func:`~pipeline.models.weights.fit`; ``table`` and
    ``prefix`` pin them); a WeightsError naming ``name`` when they fill less than
    ``min_coverage`` of it (weights of another architecture)."""
    found = fit(net.state_dict(), tables, name, table, prefix)
    if found.coverage < min_coverage:
        at = f"; best at {found.where}" if found.table or found.prefix else ""
        raise WeightsError(f"{name}: the weights fill {found.coverage:.0%} of the "
                           f"architecture's tensors (< {min_coverage:.0%}{at}): weights of "
                           "another architecture?")
    net.load_state_dict(found.state, strict=False)
    log_place(name, found)
    return found
