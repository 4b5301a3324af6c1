"""Structural coverage: does chip prune every torchvision CNN (and a set of timm models) correctly?

For every case: build the model with random weights in float64 (BatchNorm statistics and
zero-initialised layers randomised too, so every channel matters), score it with CHIP on one batch
of two random images, plan ``flops=0.5``, apply the plan (``chip.apply`` verifies it), then check

* the pruned model against the masked original (``chip.prune.masked_forward_hooks``: the
  original whose consumers do not see the removed channels, norms over the kept ones), float64,
  max relative error;
* ``plan.stats`` against ``chip.count`` of the pruned model;
* the kept MACs fraction (<= 0.5 and within 2 points of it);
* with ``--out-dir``: the ``.chip`` artifact reloaded in a NEW process (``--reload``) computes the
  same outputs.

Cases are every classification builder of ``torchvision.models.list_models`` (transformers
included: chip prunes their MLP and convolutional channels and keeps attention streams whole), the
torchvision segmentation builders, and timm models of different families. ``tests/test_coverage.py``
runs all of them; this script prints the table and writes it into the README.

    python bench/coverage.py                                   # every case, table on stdout
    python bench/coverage.py --only torchvision:resnet18 timm:dla34
    python bench/coverage.py --out-dir runs/coverage --readme README.md   # + reload, README table
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn

import chip
from chip.counting import count
from chip.errors import ChipError
from chip.groups import find_groups
from chip.prune import masked_forward_hooks
from chip.utils import flat_outputs

TARGET = "flops=0.5"
MARKERS = ("<!-- coverage:start -->", "<!-- coverage:end -->")


@dataclass(frozen=True)
class Case:
    """One model: ``builder`` ("package.module:function") called with ``kwargs``, input HxW."""

    id: str
    builder: str
    kwargs: dict = field(default_factory=dict)
    size: int = 64
    expect: str | None = None  # None: prunes to the target; else a regex of the expected ChipError
    slow: bool = False


def _torchvision_cases() -> list[Case]:
    import torchvision

    sizes = {"alexnet": 64, "inception_v3": 80, "maxvit_t": 224, "vit_h_14": 28}
    extra = {name: {"image_size": 32} for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")}
    extra["vit_h_14"] = {"image_size": 28}
    heavy = {
        "regnet_y_128gf",
        "regnet_y_32gf",
        "regnet_x_32gf",
        "vit_h_14",
        "vit_l_16",
        "vit_l_32",
        "convnext_large",
        "convnext_base",
        "maxvit_t",
        "efficientnet_v2_l",
        "swin_v2_b",
        "swin_b",
        "vgg19_bn",
        "vgg19",
        "vgg16",
        "vgg16_bn",
        "vgg13",
        "vgg13_bn",
        "vgg11",
        "vgg11_bn",
        "alexnet",
        "regnet_y_16gf",
        "resnext101_64x4d",
        "resnext101_32x8d",
        "wide_resnet101_2",
        "efficientnet_b7",
        "efficientnet_v2_m",
        "densenet161",
        "densenet201",
        "swin_v2_s",
        "swin_s",
    }
    cases = []
    for name in torchvision.models.list_models(module=torchvision.models):
        kwargs = {"weights": None, "num_classes": 10, **extra.get(name, {})}
        cases.append(
            Case(
                f"torchvision:{name}",
                f"torchvision.models:{name}",
                kwargs,
                sizes.get(name, 32),
                slow=name in heavy,
            )
        )
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        kwargs = {"weights": None, "weights_backbone": None, "num_classes": 4}
        cases.append(
            Case(
                f"torchvision:{name}",
                f"torchvision.models.segmentation:{name}",
                kwargs,
                32,
                slow="101" in name,
            )
        )
    return cases


# timm models of different families (model name -> input size); chip's outcome on each is shown
TIMM_MODELS = {
    "resnet50d": 32,
    "efficientnet_b0": 32,
    "mobilenetv3_large_100": 32,
    "convnext_atto": 32,
    "regnety_002": 32,
    "densenet121": 32,
    "dla34": 32,
    "repvgg_a0": 32,
    "rexnet_100": 32,
    "hrnet_w18_small": 64,
    "cspresnet50": 32,
    "dpn68": 32,
    "inception_v3": 80,
    "ghostnet_100": 32,
    "mixnet_s": 32,
}
TIMM_EXPECT = {"mixnet_s": r"budget 0\.5 cannot be met"}


def _timm_cases() -> list[Case]:
    return [
        Case(
            f"timm:{name}",
            "timm:create_model",
            {"model_name": name, "pretrained": False, "num_classes": 10},
            size,
            expect=TIMM_EXPECT.get(name),
        )
        for name, size in TIMM_MODELS.items()
    ]


def all_cases() -> dict[str, Case]:
    """Every case by id (timm cases only when timm is installed)."""
    cases = _torchvision_cases()
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    else:
        cases += _timm_cases()
    return {c.id: c for c in cases}


# -- one case -------------------------------------------------------------------------------------


def build(case: Case) -> nn.Module:
    """The case's model in float64 with random weights and BatchNorm statistics, in eval mode."""
    module, _, fn = case.builder.partition(":")
    model = getattr(import_module(module), fn)(**case.kwargs)
    return randomise(model.double().eval())


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights (matrices N(0, 1/fan_in), vectors U(0.5, 1.5)) and BN statistics: no
    zero-initialised head or residual branch can hide a channel."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def slug(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)


def run_case(case: Case, out_dir: Path | None = None, seed: int = 0) -> dict:
    """Run the pipeline on one case; a dict of what was measured (see the module docstring)."""
    row = {"id": case.id, "size": case.size, "outcome": "pruned"}
    start = time.perf_counter()
    try:
        model = build(case)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 3, case.size, case.size, generator=gen, dtype=torch.float64)
        input_size = (1, 3, case.size, case.size)
        t = time.perf_counter()
        graph = find_groups(model, x[:1])  # checked: what scoring, planning and the oracle share
        row["groups_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = chip.calibrate(
            model, [x], num_batches=1, progress=False, device="cpu", graph=graph
        )
        row["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = chip.plan(model, scores, TARGET, input_size=input_size, graph=graph)
        row["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pruned = chip.apply(model, plan)
        row["apply_s"] = time.perf_counter() - t
    except ChipError as exc:
        row.update(outcome=f"ChipError: {exc}", seconds=time.perf_counter() - start)
        return row
    with torch.no_grad():
        plain = flat_outputs(model(x))
        handles = masked_forward_hooks(model, plan, graph)
        try:
            expected = flat_outputs(model(x))
        finally:
            for h in handles:
                h.remove()
        output = flat_outputs(pruned(x))
    row["error"] = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(expected, output))
    # how much pruning changed the output: a comparison that could not fail would show 0 here
    row["mask_effect"] = max(
        float((a - b).abs().max() / a.abs().max()) for a, b in zip(plain, expected)
    )
    measured = count(pruned, input_size)
    row["counts_match"] = (measured.params, measured.macs) == (
        plan.stats["params"],
        plan.stats["macs"],
    )
    row["macs_kept"] = plan.stats["macs_kept"]
    row["params_kept"] = plan.stats["params_kept"]
    row["groups"] = len(plan.groups)
    row["pruned_groups"] = sum(g.kept < g.channels for g in plan.groups.values())
    row["skipped"] = dict(plan.skipped)
    if out_dir is not None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        chip.save(
            pruned,
            out_dir / f"{slug(case.id)}.chip",
            builder=case.builder,
            builder_kwargs=case.kwargs,
        )
        save_file(
            {"x": x, **{f"y{i}": y.contiguous() for i, y in enumerate(output)}},
            str(out_dir / f"{slug(case.id)}.io.safetensors"),
        )
    row["seconds"] = time.perf_counter() - start
    del model, pruned, graph
    gc.collect()
    return row


# -- reloading in a new process -----------------------------------------------------------------


def reload_all(directory: Path) -> dict[str, dict]:
    """Reload every artifact of ``directory`` in ONE new Python process; {artifact stem: result}."""
    out = subprocess.run(
        [sys.executable, __file__, "--reload", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Reloader:
    """A new Python process that reloads artifacts on request (``reloader(path)`` -> result).

    One interpreter serves many artifacts, so a matrix pays its start-up once; none of them ever
    saw the model object that was saved.
    """

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-reload"],
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def __call__(self, path: Path) -> dict:
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reload process died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def reload_one(path: Path) -> dict:
    """Load ``path`` without and with the trust flag; outputs vs those saved beside it."""
    from safetensors.torch import load_file

    row: dict = {}
    try:
        chip.load(path)
        row["untrusted"] = "loaded"
    except ChipError as exc:
        row["untrusted"] = str(exc)
    io = load_file(str(path.with_name(path.name[: -len(".chip")] + ".io.safetensors")))
    model = chip.load(path, trust_code=True).eval()
    with torch.no_grad():
        output = flat_outputs(model(io["x"]))
    row["error"] = max(
        float((io[f"y{i}"] - y).abs().max() / io[f"y{i}"].abs().max()) for i, y in enumerate(output)
    )
    del model
    gc.collect()
    return row


# -- table ----------------------------------------------------------------------------------------


def _why(skipped: dict[str, str]) -> str:
    """The distinct reasons groups were kept whole (first clause, no layer names), with counts."""
    kinds: dict[str, int] = {}
    for reason in skipped.values():
        short = reason.split(";")[0].split(", whose")[0]
        short = re.sub(r"\s*\(.*", "", short)  # details in parentheses
        short = re.sub(r" (onto|of) [\w.]+$", "", short)  # a trailing layer name
        short = re.sub(r"\b\d+ ", "", short)  # channel counts
        kinds[short] = kinds.get(short, 0) + 1
    return "; ".join(f"{n} x {k}" for k, n in kinds.items())


def table(rows: list[dict], reloads: dict[str, dict] | None = None) -> str:
    head = (
        "| model | input | groups pruned / kept whole | MACs kept | max rel. error | "
        "reloaded | find_groups s | why groups were kept whole |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r["outcome"] != "pruned":
            lines.append(
                f"| {r['id']} | {r['size']} | - | - | - | - | "
                f"{r.get('groups_s', 0):.1f} | {r['outcome'][:160]} |"
            )
            continue
        reload = "-"
        if reloads is not None and slug(r["id"]) in reloads:
            reload = f"{reloads[slug(r['id'])]['error']:.0e}"
        lines.append(
            f"| {r['id']} | {r['size']} | {r['pruned_groups']} / {len(r['skipped'])} | "
            f"{r['macs_kept']:.3f} | {r['error']:.0e} | {reload} | {r['groups_s']:.1f} | "
            f"{_why(r['skipped'])} |"
        )
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    start, end = (content.index(m) for m in MARKERS)
    readme.write_text(content[: start + len(MARKERS[0])] + "\n" + text + "\n" + content[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="case ids (default: all)")
    parser.add_argument("--out-dir", type=Path, help="save artifacts here and reload them")
    parser.add_argument("--readme", type=Path, help="write the table between the README markers")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="make the table from the rows of an earlier --json run (no models run)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-reload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reload is not None or args.serve_reload:
        torch.set_num_threads(1)
    if args.reload is not None:
        rows = {p.name[: -len(".chip")]: reload_one(p) for p in sorted(args.reload.glob("*.chip"))}
        print(json.dumps(rows))
        return 0
    if args.serve_reload:
        for line in sys.stdin:
            print(json.dumps(reload_one(Path(line.strip()))), flush=True)
        return 0
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        text = table(saved["rows"], saved["reloads"])
        print(text)
        if args.readme is not None:
            write_readme(args.readme, text)
        return 0
    torch.set_num_threads(args.threads)
    cases = all_cases()
    unknown = [c for c in args.only or () if c not in cases]
    if unknown:
        parser.error(f"unknown case ids {unknown}; expected ids like torchvision:resnet18")
    rows = []
    for case_id in args.only or list(cases):
        row = run_case(cases[case_id], args.out_dir)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    reloads = reload_all(args.out_dir) if args.out_dir is not None else None
    text = table(rows, reloads)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "reloads": reloads}, indent=1))
    if args.readme is not None:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
