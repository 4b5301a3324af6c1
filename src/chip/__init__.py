"""chip: CHannel Independence-based Pruning (CHIP, NeurIPS 2021) for PyTorch CNNs.

The public API is small and imported lazily (so ``import chip`` is cheap)::

    scores = chip.calibrate(model, loader)            # ChannelScores
    plan = chip.plan(model, scores, "[0.]+[0.15]*2+[0.4]*27")   # PruningPlan
    pruned = chip.apply(model, plan)                  # physically smaller nn.Module
    chip.count(pruned, (1, 3, 32, 32))                # params / MACs
"""

from importlib import import_module

__version__ = "0.2.0"  # the one version source (pyproject.toml reads it)

# public name -> module that defines it
_API = {
    "ChipError": "chip.errors",
    "channel_independence": "chip.ci",
    "calibrate": "chip.calibration",
    "score": "chip.criteria",
    "CHIPImportance": "chip.integrations",
    "ChannelScores": "chip.calibration",
    "find_groups": "chip.groups",
    "ChannelGroup": "chip.groups",
    "plan": "chip.planning",
    "PruningPlan": "chip.planning",
    "parse_sparsity": "chip.planning",
    "apply": "chip.prune",
    "Allocation": "chip.allocation",
    "recalibrate_bn": "chip.recalibration",
    "count": "chip.counting",
    "measure_latency": "chip.latency",
    "save": "chip.artifact",
    "load": "chip.artifact",
    "load_info": "chip.artifact",
    "export_torchscript": "chip.artifact",
    "export_onnx": "chip.artifact",
    "models": "chip.models",
    "data": "chip.data",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'chip' has no attribute {name!r}")
    module = import_module(_API[name])
    value = module if name in ("models", "data") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
