"""Model registry: a name -> :class:`ModelInfo` table, in the style of timm's ``register_model``.

Everything chip knows about an architecture lives in its :class:`ModelInfo`, registered next to
its builder (as timm keeps ``default_cfgs`` beside each model): the builder, the default input size
and class count, the layout of the reference code's sparsity strings (:class:`SparsityLayout`) and
the reference code's CI hook points. Adding an architecture is one file that calls
:func:`register_model`; the planner (sparsity strings) and the calibration step (reference CI
files) read the facts from here and name no architecture themselves.

Builders are instantiated with :func:`create`, which also records how to rebuild the model
(``model.chip_arch`` / ``model.chip_kwargs``) and can load a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

import torch.nn as nn

from chip.errors import ChipError

__all__ = [
    "IgnoredRate",
    "ModelInfo",
    "SparsityLayout",
    "arch_input_size",
    "create",
    "get_model_info",
    "list_models",
    "register_model",
]

Builder = Callable[..., nn.Module]
# for each position of a sparsity string, the names of the channel groups that take its rate
Positions = tuple[tuple[str, ...], ...]
PositionsLike = Union[Iterable[Iterable[str]], Callable[[], Iterable[Iterable[str]]]]
PointsLike = Union[Iterable[str], Callable[[], Iterable[str]]]


@dataclass(frozen=True)
class IgnoredRate:
    """A sparsity-string position whose rate has no effect of its own.

    Its groups (if any) are coupled with those of another position and take that position's rate
    instead; the planner warns when the ignored rate is non-zero and differs from it (the CIFAR
    ResNets' stem writes the stage-1 stream, so the stem rate at position 0 follows position 1).

    Attributes:
        position: 0-based index, in the sparsity string, of the ignored rate.
        follows: 0-based index of the rate that applies instead.
        warning: the warning text, a :meth:`str.format` template with the fields ``{rate}`` (the
            ignored rate) and ``{follows_rate}`` (the rate that applies).
    """

    position: int
    follows: int
    warning: str

    def message(self, rates: list[float]) -> str | None:
        """The warning for parsed ``rates``, or ``None`` when the ignored rate is 0 or equal."""
        rate, follows_rate = rates[self.position], rates[self.follows]
        if rate in (0.0, follows_rate):
            return None
        return self.warning.format(rate=rate, follows_rate=follows_rate)


@dataclass(frozen=True)
class SparsityLayout:
    """How the reference code's sparsity strings (docs/method.md section 3) map onto a model.

    Attributes:
        positions: one entry per rate of the sparsity string (its length is the number of rates
            the string must have), each the tuple of channel-group names (as
            :func:`chip.groups.find_groups` names them: the group's first producer module) that
            take that rate; an empty tuple for a position whose rate is ignored. Given as nested
            lists/tuples or as a function returning them; stored as a tuple of tuples.
        help: a one-line description of the positions, shown in the "expected exactly N rates
            (...)" error, e.g. ``"one rate per conv for the first 12 convs"``; defaults to
            ``"<N> positions"``.
        ignored: positions whose rate is ignored, with the warning to give (:class:`IgnoredRate`).
    """

    positions: Positions
    help: str = ""
    ignored: tuple[IgnoredRate, ...] = ()

    def __post_init__(self) -> None:
        raw = self.positions() if callable(self.positions) else self.positions
        positions = tuple(tuple(groups) for groups in raw)
        if not positions:
            raise ValueError("a sparsity layout needs at least one position")
        if not all(isinstance(name, str) and name for groups in positions for name in groups):
            raise ValueError("sparsity layout positions must list group names (non-empty strings)")
        ignored = tuple(self.ignored)
        for note in ignored:
            if not (0 <= note.position < len(positions) and 0 <= note.follows < len(positions)):
                raise ValueError(
                    f"ignored rate {note} is outside the layout's {len(positions)} positions"
                )
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "help", self.help or f"{len(positions)} positions")
        object.__setattr__(self, "ignored", ignored)

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class ModelInfo:
    """Registry entry: everything chip knows about one architecture.

    Attributes:
        name: the registered name (``chip_arch`` of the models :func:`create` builds).
        builder: ``fn(num_classes=..., in_channels=...) -> nn.Module`` (random init).
        input_size: default input size ``(C, H, W)`` in pixels, e.g. ``(3, 32, 32)`` for CIFAR.
        num_classes: default classifier outputs (10 CIFAR, 1000 ImageNet).
        sparsity: the sparsity-string layout, or ``None`` when the architecture takes no sparsity
            strings (the planner then asks for a rate, mapping or budget).
        reference_points: the reference code's CI hook points in its ``ci_conv{k}.npy`` order,
            as :class:`chip.calibration.HookPoint` labels (``k - 1`` indexes this tuple), or
            ``None`` when the reference code has no CI files for the architecture.
    """

    name: str
    builder: Builder
    input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    sparsity: SparsityLayout | None = None
    reference_points: tuple[str, ...] | None = None


_MODEL_TABLE: dict[str, ModelInfo] = {}


def register_model(
    name: str | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    sparsity: SparsityLayout | None = None,
    reference_points: PointsLike | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator adding ``fn(num_classes=..., in_channels=...) -> nn.Module`` to the registry.

    The registered name defaults to the function's ``__name__``; the other arguments are the
    :class:`ModelInfo` fields (``reference_points`` may be a list of labels or a function returning
    one). A name already registered raises ``ValueError``.
    """
    if reference_points is not None:
        raw = reference_points() if callable(reference_points) else reference_points
        reference_points = tuple(raw)
        if not all(isinstance(label, str) and label for label in reference_points):
            raise ValueError("reference_points must be hook-point labels (non-empty strings)")
    if sparsity is not None and not isinstance(sparsity, SparsityLayout):
        raise TypeError(f"sparsity must be a SparsityLayout, got {type(sparsity).__name__}")
    c, h, w = (int(n) for n in input_size)

    def decorator(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in _MODEL_TABLE:
            raise ValueError(f"model {key!r} is already registered")
        _MODEL_TABLE[key] = ModelInfo(
            key, fn, (c, h, w), int(num_classes), sparsity, reference_points
        )
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return sorted(_MODEL_TABLE)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; unknown names raise :class:`ChipError` listing the zoo."""
    try:
        return _MODEL_TABLE[name]
    except (KeyError, TypeError):
        raise ChipError(
            f"unknown model {name!r}; expected one of: {', '.join(list_models())}"
        ) from None


def arch_input_size(name: str) -> tuple[int, int, int]:
    """Default input size (C, H, W) of architecture ``name``: (3, 32, 32) CIFAR, (3, 224, 224) ImageNet."""
    return get_model_info(name).input_size


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChipError(f"{what} must be a positive integer, got {value!r}")
    return value


def create(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    strict: bool = True,
    trust_code: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Build the model ``name`` names and optionally load ``checkpoint`` into it.

    Args:
        name: a model source (:mod:`chip.models.sources`): a zoo name such as ``"resnet56"``,
            ``"torchvision:NAME"``, ``"timm:NAME"``, ``"path/to/file.py:function"`` or
            ``"package.module:function"``.
        num_classes: size of the classifier output; ``None`` = the model's default (10 for the
            CIFAR zoo, 1000 for ``resnet50``, the builder's own otherwise).
        in_channels: channels of the input images; ``None`` = 3. The zoo builds its stem for it,
            timm models get ``in_chans``; torchvision models take 3 only.
        checkpoint: path to a state_dict file or an in-memory state_dict (any layout accepted by
            :func:`chip.checkpoint.load_weights`).
        strict: require the checkpoint keys to match the model's exactly.
        trust_code: trust the files and code named: allow full (code-executing) unpickling of
            the checkpoint and importing the user's model code.
        **model_kwargs: further keyword arguments for the builder (not for zoo models).

    Raises:
        ChipError: an unknown or malformed source, user code without ``trust_code``, keyword
            arguments the builder does not take, a checkpoint that does not fit.

    The returned model has ``chip_arch`` (= ``name``) and ``chip_kwargs`` attributes, so it can be
    rebuilt with ``create(model.chip_arch, **model.chip_kwargs)``, and ``chip_input_size``
    (C, H, W) where the source declares one.
    """
    from chip.models.sources import resolve_source

    source = resolve_source(name)
    if source.kind == "zoo":
        if model_kwargs:
            raise ChipError(
                f"zoo model {name!r} takes num_classes and in_channels only, got "
                f"{sorted(model_kwargs)}"
            )
        info = get_model_info(name)
        kwargs = {
            "num_classes": _check_positive_int(
                info.num_classes if num_classes is None else num_classes, "num_classes"
            ),
            "in_channels": _check_positive_int(
                3 if in_channels is None else in_channels, "in_channels"
            ),
        }
    else:
        kwargs = dict(model_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = _check_positive_int(num_classes, "num_classes")
        if in_channels is not None and in_channels != 3:
            _check_positive_int(in_channels, "in_channels")
            if source.kind == "torchvision":
                raise ChipError(
                    f"{name} takes 3-channel images, but {in_channels} input channels were asked "
                    "for; use 3-channel data (or a timm model: it takes in_chans)"
                )
            kwargs["in_chans" if source.kind == "timm" else "in_channels"] = in_channels
    model = source.build(kwargs, trust_code=trust_code)
    if checkpoint is not None:
        from chip.checkpoint import load_weights

        load_weights(model, checkpoint, strict=strict, trust_code=trust_code)
    return model
