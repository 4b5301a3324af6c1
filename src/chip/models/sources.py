"""Where a model comes from: one way to name a model in every command, run config and ``create``.

A *model source* is one of

* a zoo name, ``resnet56`` (:func:`chip.models.list_models`);
* ``torchvision:NAME``: a classification or segmentation builder of
  ``torchvision.models.list_models()`` (``weights=None`` unless given; segmentation builders also
  get ``weights_backbone=None``, so nothing is downloaded);
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (the optional extra
  ``pip install chip-prune[timm]``);
* ``path/to/file.py:function`` or ``package.module:function``: the user's own code, imported only
  with ``trust_code=True`` (CLI ``--trust-code``), since importing it runs it.

Keyword arguments (``--model-kwargs key=value,...``) go to the builder. A model built from a source
carries ``chip_arch`` (the source text), ``chip_kwargs`` (the keyword arguments) and, where the
source knows it, ``chip_input_size`` (C, H, W), so :func:`chip.save` can record how to rebuild it
and :func:`chip.load` can rebuild it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.nn as nn

from chip.errors import ChipError

__all__ = ["PREFIXES", "ModelSource", "build_kwargs", "resolve_source"]

PREFIXES = {
    "torchvision": "torchvision:NAME (a torchvision classification or segmentation builder)",
    "timm": "timm:NAME (a timm model; pip install chip-prune[timm])",
}
_CODE = re.compile(r"(?P<where>[^:]+):(?P<fn>[A-Za-z_]\w*)")
_MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
SOURCE_FORMS = (
    "a zoo name (resnet56), torchvision:NAME, timm:NAME, path/to/file.py:function or "
    "package.module:function"
)


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source (see the module docstring).

    ``kind`` is ``"zoo"``, ``"torchvision"``, ``"timm"`` or ``"code"``; ``name`` the zoo, torchvision
    or timm name, or for code the file or module; ``function`` the builder function of code.
    """

    text: str
    kind: str
    name: str
    function: str = ""

    @property
    def needs_trust(self) -> bool:
        """Whether building it imports code named by the user (needs ``trust_code=True``)."""
        return self.kind == "code"

    def data_sizes(
        self, num_classes: int | None, in_channels: int | None, trust_code: bool = False
    ) -> tuple[int | None, int | None]:
        """The data's class and channel counts to pass to the builder: both for zoo,
        torchvision and timm sources; for user code only those its builder's signature takes
        (reading it imports the code: needs ``trust_code``); None for the others."""
        if self.kind != "code":
            return num_classes, in_channels
        fn, _ = _code(self, trust_code)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read: let the call decide
            return num_classes, in_channels
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return num_classes, in_channels
        return (
            num_classes if "num_classes" in params else None,
            in_channels if "in_channels" in params else None,
        )

    def build(self, kwargs: Mapping[str, Any], trust_code: bool = False) -> nn.Module:
        """The unpruned model (with ``chip_arch`` / ``chip_kwargs`` / ``chip_input_size``)."""
        builder, defaults = _BUILDERS[self.kind](self, trust_code)
        given = {**defaults, **kwargs}
        try:
            model = builder(**given)
        except TypeError as exc:
            raise ChipError(
                f"model {self.text!r} does not accept the keyword arguments {dict(kwargs)} "
                f"({exc}); expected keywords of its builder"
            ) from None
        if not isinstance(model, nn.Module):
            raise ChipError(
                f"model {self.text!r} built a {type(model).__name__}; expected an nn.Module"
            )
        model.chip_arch = self.text
        model.chip_kwargs = dict(kwargs)
        size = _input_size(self, model)
        if size is not None:
            model.chip_input_size = size
        return model


def build_kwargs(
    source: str,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    data: tuple[int | None, int | None] = (None, None),
    trust_code: bool = False,
) -> dict[str, Any]:
    """The keyword arguments to build ``source`` with (for :func:`chip.models.create`).

    For ``num_classes`` and ``in_channels`` the explicit value wins, then ``model_kwargs``, then
    ``data`` (the dataset's class and channel counts, passed only where the builder takes them:
    :meth:`ModelSource.data_sizes`). The command line and ``chip run`` both build through this.
    """
    kwargs = dict(model_kwargs or {})
    from_data = resolve_source(source).data_sizes(*data, trust_code)
    for key, given, found in zip(
        ("num_classes", "in_channels"), (num_classes, in_channels), from_data
    ):
        if given is not None:
            kwargs[key] = given
        elif key not in kwargs and found is not None:
            kwargs[key] = found
    return kwargs


def resolve_source(text: str) -> ModelSource:
    """Parse a model source; a one-line :class:`ChipError` naming the accepted forms if bad."""
    from chip.models.registry import _MODEL_TABLE

    if not isinstance(text, str) or not text.strip():
        raise ChipError(f"empty model name; expected {SOURCE_FORMS}")
    text = text.strip()
    if text in _MODEL_TABLE:
        return ModelSource(text, "zoo", text)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ChipError(f"model {text!r} names no model; expected {PREFIXES[prefix]}")
        return ModelSource(text, prefix, rest)
    m = _CODE.fullmatch(text)
    if m is not None and (m["where"].endswith(".py") or _MODULE.fullmatch(m["where"])):
        return ModelSource(text, "code", m["where"], m["fn"])
    from chip.models.registry import list_models

    raise ChipError(
        f"unknown model {text!r}; expected {SOURCE_FORMS} (zoo: {', '.join(list_models())})"
    )


# -- builders per kind ------------------------------------------------------------------------


def _zoo(source: ModelSource, trust_code: bool):
    from chip.models.registry import get_model_info

    return get_model_info(source.name).builder, {}


def _torchvision(source: ModelSource, trust_code: bool):
    import torchvision

    known = torchvision.models.list_models()
    if source.name not in known:
        raise ChipError(
            f"unknown torchvision model {source.name!r}; expected a name of "
            "torchvision.models.list_models(), e.g. resnet18, mobilenet_v3_large, fcn_resnet50"
        )
    builder = torchvision.models.get_model_builder(source.name)
    defaults: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        defaults["weights_backbone"] = None
    return builder, defaults


def _timm(source: ModelSource, trust_code: bool):
    try:
        import timm
    except ImportError:
        raise ChipError(
            f"model {source.text!r} needs timm, which is not installed; "
            "pip install chip-prune[timm] (or pip install timm)"
        ) from None
    if not timm.is_model(source.name):
        raise ChipError(
            f"unknown timm model {source.name!r}; expected a name of timm.list_models(), "
            "e.g. resnet50d, efficientnet_b0, convnext_atto"
        )

    def build(**kwargs):
        return timm.create_model(source.name, **kwargs)

    return build, {"pretrained": False}


def _code(source: ModelSource, trust_code: bool):
    if not trust_code:
        raise ChipError(
            f"model {source.text!r} is the user's code: importing it runs it, so chip imports it "
            "only when told to; pass --trust-code (Python: trust_code=True) if you trust it"
        )
    if source.name.endswith(".py"):
        module = _import_file(Path(source.name))
    else:
        try:
            module = importlib.import_module(source.name)
        except ImportError as exc:
            raise ChipError(
                f"model {source.text!r}: cannot import {source.name!r} ({exc})"
            ) from None
    fn = getattr(module, source.function, None)
    if not callable(fn):
        raise ChipError(
            f"model {source.text!r}: {source.name} has no function {source.function!r}; "
            "expected a function that returns an nn.Module"
        )
    return fn, {}


def _import_file(path: Path):
    if not path.is_file():
        raise ChipError(f"model file not found: {path} (expected path/to/file.py:function)")
    name = f"chip_user_model_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code failed: say so in one line
        del sys.modules[name]
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ChipError(
            f"model file {path} failed to import: {type(exc).__name__}: {text}"
        ) from None
    return module


_BUILDERS: dict[str, Callable[[ModelSource, bool], tuple[Callable[..., nn.Module], dict]]] = {
    "zoo": _zoo,
    "torchvision": _torchvision,
    "timm": _timm,
    "code": _code,
}


def _input_size(source: ModelSource, model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) the source declares: the zoo's, or timm's pretrained config; else None."""
    if source.kind == "zoo":
        from chip.models.registry import get_model_info

        size = get_model_info(source.name).input_size
        return (model.chip_kwargs.get("in_channels", size[0]),) + tuple(size[1:])
    if source.kind == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        if size is not None and len(size) == 3:
            return (int(getattr(model, "in_chans", size[0])),) + tuple(int(s) for s in size[1:])
    return None
