"""Pruned-model artifacts that rebuild without pickled code, plus TorchScript / ONNX export.

:func:`save` writes ONE safetensors file: the ``state_dict`` tensors and, as the only metadata
entry (key ``"chip.artifact"``), a JSON header naming how to rebuild the module::

    {"format": "chip.artifact", "format_version": 1,
     "arch": "resnet56", "kwargs": {"num_classes": 10, "in_channels": 3},
     "builder": null, "plan": {...PruningPlan.to_dict()...} or null,
     "chip_version": "0.2.0", "torch_version": "2.14.1", "extra": {...user data...},
     "check_buffers": ["layer2.0.shortcut.src", ...],
     "state_dict_metadata": {"": {"version": 2}, "layers.0": {"version": 1}, ...}}

:func:`load` rebuilds ``chip.models.create(arch, **kwargs)``, re-applies the plan with
:func:`chip.prune.apply` and loads the weights with ``strict=True``. ``arch`` is the model source
the model was created from (:mod:`chip.models.sources`): a zoo name, ``torchvision:NAME``,
``timm:NAME`` (rebuilt from the installed library, trusted) or the user's code
``path/to/file.py:function`` / ``package.module:function``. Nothing is unpickled, so a file from a
stranger cannot run code - unless it names the user's code (or a ``builder``, see below) and the
caller passes ``trust_code=True``.

Non-persistent buffers (the ``src`` / ``dst`` index buffers of the option-A
:class:`~chip.models.PadShortcut`) are not part of the ``state_dict``: re-applying the plan
rebuilds them. Their saved values are stored as well (``check_buffers``, under the tensor-name
prefix ``__chip_check__.``) and compared after the rebuild, so a plan that does not match the
stored model is an error instead of silently wrong outputs.

``state_dict_metadata`` is the ``_metadata`` that ``nn.Module.state_dict()`` attaches (module
prefix -> ``{"version": ...}``, the per-module format versions that some modules'
``_load_from_state_dict`` need, e.g. torchvision's MNASNet); :func:`load` puts it back on the state
dict before ``load_state_dict``, as ``torch.load`` would. Files written without it (older chip)
load as before, with no metadata.

Models chip did not create (no ``chip_arch``) cannot be rebuilt from data alone. Either create
them with :func:`chip.models.create`, export them (:func:`export_torchscript`,
:func:`export_onnx`) or name a builder, ``"package.module:function"``, that :func:`load` imports and
calls with ``builder_kwargs``; since that runs code named in the file, :func:`load` requires
``trust_code=True`` for such files.

:func:`load_info` reads only the header (cheap, no tensors).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .checkpoint import check_state_dict
from .errors import ChipError
from .utils import atomic_path, atomic_write, eval_mode

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "export_onnx",
    "export_torchscript",
    "load",
    "load_info",
    "load_plan",
    "save",
]

FORMAT = "chip.artifact"
FORMAT_VERSION = 1
# the ONLY safetensors metadata key (one key keeps the file bytes deterministic: safetensors
# writes its metadata map in hash order); its value is the JSON header
_META_KEY = "chip.artifact"
_CHECK_PREFIX = "__chip_check__."  # tensor-name prefix of the saved non-persistent buffers
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_BUILDER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_NOT_ARTIFACT = "expected a file written by chip.save (safetensors with 'chip.artifact' metadata)"


# -- saving ----------------------------------------------------------------------------------------


def save(
    model: nn.Module,
    path,
    *,
    extra: Mapping[str, Any] | None = None,
    builder: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (pruned or not) to ``path`` as a code-free chip artifact, atomically.

    Args:
        model: a zoo model (it carries ``chip_arch`` / ``chip_kwargs``) or the result of
            :func:`chip.apply` on one (it also carries ``chip_plan``).
        path: destination file (conventionally ``*.safetensors``).
        extra: JSON-serialisable dict stored verbatim (metrics, dataset, notes).
        builder: ``"package.module:function"`` returning the unpruned model, for models outside
            the zoo; :func:`load` then needs ``trust_code=True``.
        builder_kwargs: keyword arguments for ``builder`` (default: ``model.chip_kwargs`` or none).

    Returns the path written.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise ChipError(
            f"chip.save needs an nn.Module, got {type(model).__name__}; "
            "save TorchScript modules with torch.jit.save"
        )
    header = _header(model, extra, builder, builder_kwargs)
    tensors, checks, metadata = _tensors(model)
    header["check_buffers"] = checks
    header["state_dict_metadata"] = _state_metadata(metadata, "the model's state_dict metadata")
    _json(header["state_dict_metadata"], "the model's state_dict metadata")
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:  # written straight from the tensors: no in-memory file copy
        save_file(tensors, str(tmp), metadata={_META_KEY: _json(header, "header")})
    return path


def _header(model: nn.Module, extra, builder, builder_kwargs) -> dict[str, Any]:
    """The JSON header of an artifact (everything except the tensors)."""
    from . import __version__

    arch = getattr(model, "chip_arch", None)
    if builder is not None:
        _resolve_builder(builder)  # fail now, not when loading
    elif arch is None:
        raise ChipError(
            f"cannot save {type(model).__name__}: chip does not know where it comes from (no "
            "chip_arch); build it with chip.models.create(SOURCE) (a zoo name, torchvision:NAME, "
            "timm:NAME or path/to/file.py:function), or pass builder='package.module:function', "
            "or export it (chip.artifact.export_torchscript / export_onnx)"
        )
    else:
        from .models.sources import resolve_source

        resolve_source(arch)  # a malformed source -> ChipError now, not when loading
    kwargs = dict(
        builder_kwargs if builder_kwargs is not None else getattr(model, "chip_kwargs", {})
    )
    plan = getattr(model, "chip_plan", None)
    if extra is not None and not isinstance(extra, Mapping):
        raise ChipError(f"extra must be a JSON-serialisable dict, got {type(extra).__name__}")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "kwargs": kwargs,
        "builder": builder,
        "plan": plan.to_dict() if plan is not None else None,
        # a model pruned more than once: the plans applied before ``plan``, in order
        "earlier_plans": [p.to_dict() for p in getattr(model, "chip_earlier_plans", [])],
        "chip_version": __version__,
        "torch_version": str(torch.__version__),
        "extra": dict(extra) if extra is not None else {},
    }
    for key in ("kwargs", "extra"):
        _json(header[key], key)
    return header


def _json(value: Any, what: str) -> str:
    """Strict (portable) JSON text of ``value``; ChipError naming ``what`` if impossible."""
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ChipError(
            f"{what} is not JSON-serialisable ({exc}); expected dicts, lists, "
            "strings, finite numbers, booleans and None"
        ) from None


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], Any]:
    """The state_dict on the CPU plus the non-persistent buffers (prefixed), for safetensors,
    and the state_dict's ``_metadata`` (None if it has none)."""
    state = model.state_dict()
    seen: set[int] = set()
    tensors = {k: _cpu_copy(v, seen) for k, v in state.items()}
    checks = [name for name, _ in model.named_buffers() if name not in state]
    for name in checks:
        tensors[_CHECK_PREFIX + name] = _cpu_copy(model.get_buffer(name), seen)
    return tensors, checks, getattr(state, "_metadata", None)


_METADATA_FORM = (
    "expected a dict of module prefix -> dict of JSON values, e.g. "
    '{"": {"version": 2}, "layers.0": {"version": 1}}'
)


def _state_metadata(value: Any, what: str) -> dict[str, dict[str, Any]] | None:
    """``value`` as a plain ``{prefix: {name: value}}`` dict (None stays None); ChipError naming
    ``what`` and the first offending entry if it has another form."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ChipError(f"{what} is malformed (a {type(value).__name__}); {_METADATA_FORM}")
    for prefix, entry in value.items():
        if not (
            isinstance(prefix, str)
            and isinstance(entry, Mapping)
            and all(isinstance(name, str) for name in entry)
        ):
            raise ChipError(
                f"{what} is malformed (entry {prefix!r:.60}: {entry!r:.60}); {_METADATA_FORM}"
            )
    return {prefix: dict(entry) for prefix, entry in value.items()}


def _cpu_copy(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """``t`` on the CPU, copied only where safetensors needs it: views, non-contiguous tensors
    and tensors sharing storage with one already taken (``seen`` holds storage pointers)."""
    t = t.detach().cpu()
    storage = t.untyped_storage()
    whole = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and storage.nbytes() == t.numel() * t.element_size()
    )
    if not whole or storage.data_ptr() in seen or t.numel() == 0:
        t = t.clone(memory_format=torch.contiguous_format)
    seen.add(t.untyped_storage().data_ptr())
    return t


# -- reading ---------------------------------------------------------------------------------------


def _read_header(path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(chip header, safetensors tensor table) of ``path``, validated; reads no tensor data."""
    path = Path(path)
    if not path.is_file():
        raise ChipError(f"artifact not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise ChipError(f"{path} is not a chip artifact; {_NOT_ARTIFACT}")
        raw = f.read(n)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ChipError(f"{path} is not a chip artifact; {_NOT_ARTIFACT}") from None
    meta = table.pop("__metadata__", None) if isinstance(table, dict) else None
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise ChipError(f"{path} is not a chip artifact (no chip metadata); {_NOT_ARTIFACT}")
    try:
        header = json.loads(meta[_META_KEY])
        end = max((int(v["data_offsets"][1]) for v in table.values()), default=0)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, IndexError):
        raise ChipError(f"{path} has a corrupt chip header; {_NOT_ARTIFACT}") from None
    if not isinstance(header, dict):
        raise ChipError(f"{path} has a corrupt chip header; {_NOT_ARTIFACT}")
    version = header.get("format_version")
    if header.get("format") != FORMAT or isinstance(version, bool) or not isinstance(version, int):
        raise ChipError(f"{path} has unknown format {header.get('format')!r}; {_NOT_ARTIFACT}")
    if version > FORMAT_VERSION:
        raise ChipError(
            f"{path} uses artifact format version {version}, newer than this chip "
            f"reads ({FORMAT_VERSION}); upgrade chip"
        )
    if 8 + n + end != size:
        raise ChipError(f"{path} is truncated or corrupt: {size} bytes, header says {8 + n + end}")
    return header, table


def load_info(path) -> dict[str, Any]:
    """The metadata of an artifact without loading any tensor.

    Returns ``{"path", "format", "format_version", "arch", "kwargs", "builder", "pruned",
    "plan", "chip_version", "torch_version", "extra", "tensors", "bytes"}`` where ``plan`` is a
    summary (``target``, ``input_size``, ``groups``, ``pruned_groups``, ``widths``
    = {group: [kept, channels]}, ``stats``) or ``None`` for an unpruned model.
    """
    header, table = _read_header(path)
    plan = header.get("plan")
    summary = None
    if plan is not None:
        groups = plan.get("groups", {})
        widths = {name: [len(g["keep"]), g["channels"]] for name, g in groups.items()}
        summary = {
            "target": plan.get("target", ""),
            "input_size": plan.get("input_size"),
            "groups": len(groups),
            "pruned_groups": sum(kept < channels for kept, channels in widths.values()),
            "widths": widths,
            "stats": plan.get("stats", {}),
        }
    keys = (
        "format",
        "format_version",
        "arch",
        "kwargs",
        "builder",
        "chip_version",
        "torch_version",
        "extra",
    )
    info = {"path": str(path), **{k: header.get(k) for k in keys}}
    info.update(
        pruned=plan is not None,
        plan=summary,
        tensors=sum(not k.startswith(_CHECK_PREFIX) for k in table),
        bytes=Path(path).stat().st_size,
    )
    return info


def load_plan(path):
    """The :class:`~chip.planning.PruningPlan` stored in an artifact, or ``None`` if unpruned."""
    return _plan(_read_header(path)[0])


def _plan(header: Mapping[str, Any]):
    from .planning import PruningPlan

    return None if header.get("plan") is None else PruningPlan.from_dict(header["plan"])


# -- loading ---------------------------------------------------------------------------------------


def load(path, *, map_location="cpu", trust_code: bool = False) -> nn.Module:
    """Rebuild the model saved by :func:`save` (architecture, plan, weights); no unpickling.

    Args:
        path: an artifact file.
        map_location: device for the returned model.
        trust_code: allow importing and calling the ``"package.module:function"`` builder an
            artifact names (only needed for models outside the zoo; that runs code).

    Returns the model in eval mode (call ``.train()`` to fine-tune), with ``chip_arch``,
    ``chip_kwargs`` and, if pruned, ``chip_plan``, so it can be saved again. Parameter dtypes
    are those saved. Any mismatch between header and weights raises :class:`ChipError`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = _device(map_location)
    header, _ = _read_header(path)
    metadata = _state_metadata(
        header.get("state_dict_metadata"), f"{path}: the stored state_dict_metadata"
    )
    plan = _plan(header)
    model = _build(path, header, trust_code)
    if plan is not None:
        from .planning import PruningPlan
        from .prune import apply

        plans = [*map(PruningPlan.from_dict, header.get("earlier_plans") or []), plan]
        for i, step in enumerate(plans):
            try:
                apply(model, step, inplace=True, verify=False)  # checked when it was made
            except ChipError as exc:
                which = f" ({i + 1} of {len(plans)})" if len(plans) > 1 else ""
                raise ChipError(f"{path}: cannot re-apply the stored plan{which}: {exc}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ChipError(f"{path} is corrupt ({exc}); {_NOT_ARTIFACT}") from None
    checks = {
        k[len(_CHECK_PREFIX) :]: tensors.pop(k)
        for k in list(tensors)
        if k.startswith(_CHECK_PREFIX)
    }
    check_state_dict(
        model,
        tensors,
        strict=True,
        subject=f"{path}: stored weights do not match the rebuilt model",
        hint="the plan or architecture in the header does not belong to these weights",
    )
    state = OrderedDict(tensors)  # a plain dict cannot carry _metadata
    if metadata is not None:
        state._metadata = metadata
    model.load_state_dict(state, strict=True, assign=True)
    _check_buffers(path, model, checks, header.get("check_buffers", []))
    model.chip_kwargs = dict(header.get("kwargs") or {})
    if header.get("arch") is not None:
        model.chip_arch = header["arch"]
    return model.to(device).eval()


def _device(map_location) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ChipError(
            f"bad map_location {map_location!r}; expected 'cpu', 'cuda', 'cuda:1' or a torch.device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChipError(f"map_location {map_location!r} but CUDA is not available; use 'cpu'")
    return device


def _build(path, header: Mapping[str, Any], trust_code: bool) -> nn.Module:
    """The unpruned model: the named builder (if trusted) or the recorded model source."""
    kwargs = header.get("kwargs") or {}
    builder = header.get("builder")
    if builder is not None:
        if not trust_code:
            raise ChipError(
                f"{path} is rebuilt by code it names (builder {builder!r}); pass "
                "trust_code=True (CLI: --trust-code) to import and run it, if you "
                "trust the file"
            )
        fn, what = _resolve_builder(builder), f"builder {builder!r}"
    else:
        from .models import create

        arch = header.get("arch")

        def fn(**kw):
            return create(arch, trust_code=trust_code, **kw)

        what = f"model {arch!r}"
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise ChipError(
            f"{path}: {what} does not accept the stored kwargs {kwargs} ({exc})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ChipError(f"{path}: {what} returned {type(model).__name__}, expected an nn.Module")
    return model


def _resolve_builder(text: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:function"`` (no eval); ChipError if it is not a callable."""
    if not isinstance(text, str) or not _BUILDER.fullmatch(text):
        raise ChipError(f"bad builder {text!r}; expected 'package.module:function'")
    module_name, attr = text.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ChipError(f"builder {text!r}: cannot import {module_name!r} ({exc})") from None
    except AttributeError:
        raise ChipError(f"builder {text!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise ChipError(f"builder {text!r} is not callable; expected a function returning a model")
    return fn


def _check_buffers(
    path, model: nn.Module, saved: Mapping[str, torch.Tensor], names: Sequence[str]
) -> None:
    """The rebuilt non-persistent buffers must equal the saved ones (plan consistency)."""
    if sorted(saved) != sorted(names):
        raise ChipError(f"{path} has a corrupt buffer table; {_NOT_ARTIFACT}")
    for name, value in saved.items():
        try:
            rebuilt = model.get_buffer(name)
        except AttributeError:
            rebuilt = None
        if rebuilt is None or rebuilt.shape != value.shape or not torch.equal(rebuilt.cpu(), value):
            raise ChipError(
                f"{path}: buffer {name!r} rebuilt from the stored plan differs from the "
                "saved one; the plan in the header does not belong to these weights"
            )


# -- export ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; every submodule's training flag is restored."""
    with eval_mode(model), torch.no_grad():
        yield


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _close(a, b, rtol: float, atol: float) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(fa, fb)
    )


def _script(model: nn.Module, inputs: tuple) -> torch.jit.ScriptModule:
    return torch.jit.script(model)


def _trace(model: nn.Module, inputs: tuple) -> torch.jit.ScriptModule:
    return torch.jit.trace(model, inputs)


_JIT_METHODS: dict[str, tuple[Callable[[nn.Module, tuple], torch.jit.ScriptModule], ...]] = {
    "auto": (_script, _trace),
    "script": (_script,),
    "trace": (_trace,),
}


def export_torchscript(
    model: nn.Module,
    path,
    example_inputs,
    *,
    method: str = "auto",
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> Path:
    """Write ``model`` (in eval mode) as TorchScript, atomically; load with ``torch.jit.load``.

    ``method="auto"`` tries ``torch.jit.script`` (keeps shape logic general) and falls back to
    ``torch.jit.trace`` on ``example_inputs`` (a tensor or a tuple of tensors). The exported
    module must reproduce the eager outputs on ``example_inputs`` (within ``rtol``/``atol``),
    else :class:`ChipError`. TorchScript is deprecated in recent torch; its warnings are muted.
    """
    if method not in _JIT_METHODS:
        raise ChipError(
            f"unknown TorchScript method {method!r}; expected one of {list(_JIT_METHODS)}"
        )
    inputs = _as_tuple(example_inputs)
    failures = []
    with _inference(model), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning
        )
        reference = model(*inputs)
        for convert in _JIT_METHODS[method]:
            name = convert.__name__.strip("_")
            try:
                exported = convert(model, inputs)
            except Exception as exc:  # torch.jit raises many unrelated types
                failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            if _close(exported(*inputs), reference, rtol, atol):
                with atomic_write(path) as f:
                    torch.jit.save(exported, f)
                return Path(path)
            failures.append(f"{name}: outputs differ from the eager model")
    raise ChipError(f"TorchScript export failed ({'; '.join(failures)}); try export_onnx")


def export_onnx(
    model: nn.Module,
    path,
    example_inputs,
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (in eval mode) as ONNX, atomically, and check it with ``onnx.checker``.

    Uses torch's TorchScript-based exporter (``dynamo=False``), which needs the ``onnx`` package.
    Inputs are named ``input`` (``input0``, ``input1``, ... for several), outputs ``output``;
    with ``dynamic_batch`` the first axis of every input and output is symbolic (``batch``).
    """
    try:
        import onnx
    except ImportError:
        raise ChipError("ONNX export needs the 'onnx' package (pip install onnx)") from None
    inputs = _as_tuple(example_inputs)
    if input_names is None:
        input_names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
    with _inference(model):
        n_out = len(_flat(model(*inputs)))
    if output_names is None:
        output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    axes = {name: {0: "batch"} for name in [*input_names, *output_names]} if dynamic_batch else None
    buffer = io.BytesIO()
    kwargs = {"dynamo": False} if "dynamo" in _export_parameters() else {}
    with _inference(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            inputs,
            buffer,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            **kwargs,
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def _export_parameters() -> set[str]:
    import inspect

    return set(inspect.signature(torch.onnx.export).parameters)
