"""The ``lorafuse`` command.

``lorafuse inspect DIR [--json]`` reads the PEFT-format adapter in folder DIR (adapter_config.json +
adapter_model.safetensors) with :func:`lorafuse.read_adapter`, which validates it exactly as
:func:`lorafuse.load_adapter` does, and describes it: its config and the effective scale of each rank, every
tensor (name, shape, dtype), every adapted module with its rank, the targets grouped by name, the parameter
count and the size of each file, the warnings, and finally ``valid``.

Exit status: 0 for a valid adapter; 1 for an invalid one (the reason on stderr as
``lorafuse inspect: invalid adapter: <message>``); 2 for a usage error.

``lorafuse quantize SRC DST [--method nf4|nf3|lq-lora] [--blocksize N] [--no-double-quant] [--compute-dtype DTYPE]
[--keep-dense NAME ...] [--budget BITS] [--rank R] [--fisher TEXT]``
stores the Hugging Face checkpoint in folder SRC (a transformers model: config.json and safetensors weights) quantized
as folder DST. ``nf4`` (default) and ``nf3``: the model is built on the meta device and each Linear layer quantized
as it loads (:func:`lorafuse.load_checkpoint` with ``quantize``), so memory peaks near the quantized size; NF4 checkpoints
load in transformers + bitsandbytes too, NF3 ones in lorafuse (:func:`lorafuse.load_checkpoint`). ``lq-lora``: the
dense model is loaded, every Linear layer but the kept-dense ones decomposed as Q + L1·L2 within ``--budget`` bits per
weight at rank ``--rank`` (:func:`lorafuse.lq_lora`; ``--fisher TEXT``: Fisher-weighted, from windows of that text
file), the model with Q saved as DST/base and the adapter starting at L1·L2 as DST/adapter (PEFT's format); the
allocation is printed. SRC's other files (tokenizer, generation config) are copied beside the weights. Exit status 0;
1 on an error (the reason on stderr as ``lorafuse quantize: <message>``); 2 for a usage error.

Also runs as ``python -m lorafuse ...`` and ``python -m lorafuse.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's tensor names: base_model.model.<module path>.lora_A.weight

# The LoraConfig fields shown, in this order.
CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "bias",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
)


class InvalidAdapter(ValueError):
    """The folder does not hold an adapter that lorafuse loads."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description="lorafuse command-line tools.")
    parser.add_argument("--version", action="store_true", help="print lorafuse's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="describe and validate a PEFT-format adapter folder",
        description=(
            "Reads the adapter in DIR (adapter_config.json + adapter_model.safetensors), validates it as "
            "lorafuse.load_adapter does, and describes it. Exit status 0: valid; 1: invalid (the reason on "
            "stderr); 2: usage error."
        ),
    )
    inspect.add_argument("dir", metavar="DIR", help="the adapter folder")
    inspect.add_argument("--json", action="store_true", help="print the description as one JSON object")
    quantize = commands.add_parser(
        "quantize",
        help="store a Hugging Face checkpoint's Linear layers quantized (NF4, NF3 or LQ-LoRA)",
        description=(
            "Loads the transformers checkpoint in SRC onto the meta device, quantizing each Linear layer to NF4 "
            "(or NF3) as it loads, and saves it as DST, which lorafuse.load_checkpoint (and for NF4 transformers + "
            "bitsandbytes) load; --method lq-lora: LQ-LoRA within --budget bits per weight, the quantized base in "
            "DST/base and the adapter in DST/adapter. Exit status 0; 1 on an error; 2: usage error."
        ),
    )
    quantize.add_argument("src", metavar="SRC", help="the checkpoint folder (config.json, *.safetensors)")
    quantize.add_argument("dst", metavar="DST", help="the folder to write (created; other files in it are kept)")
    quantize.add_argument(
        "--method",
        choices=("nf4", "nf3", "lq-lora"),
        default="nf4",
        help="nf4 (QLoRA's, default), nf3, or lq-lora (Q + L1·L2 per matrix within --budget)",
    )
    quantize.add_argument("--blocksize", type=int, default=64, help="block size: 32, 64, ..., 4096 (default 64)")
    quantize.add_argument("--budget", type=float, default=2.75, help="lq-lora: bits per weight (default 2.75)")
    quantize.add_argument("--rank", type=int, default=64, help="lq-lora: rank of L1·L2 (default 64)")
    quantize.add_argument("--fisher", metavar="TEXT", help="lq-lora: a text file whose windows give the Fisher")
    quantize.add_argument(
        "--no-double-quant", action="store_true", help="keep the block statistics in float32 (4.5 bits per weight)"
    )
    quantize.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the dtype the 4-bit layers compute in (default: each weight's dtype)",
    )
    quantize.add_argument(
        "--keep-dense",
        nargs="+",
        metavar="NAME",
        default=["lm_head"],
        help="layers left dense, by name or path suffix (default: lm_head)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``lorafuse`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        import lorafuse

        print(f"lorafuse {lorafuse.__version__}")
        return 0
    if args.command is None:
        parser.error("a command is required: inspect or quantize")  # exits 2, as argparse's other usage errors
    if args.command == "quantize":
        return _quantize_command(args)
    return _inspect_command(args.dir, args.json)


# Files of a checkpoint folder that `quantize` writes anew rather than copies.
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json")


def quantize_checkpoint(src: str, dst: str, config: Any) -> List[str]:
    """The ``quantize`` command's work: SRC loaded onto a meta skeleton with every Linear layer but
    ``config.modules_to_not_convert`` quantized as it loads, saved as DST with SRC's other files. Returns the paths
    quantized."""

    import transformers
    from accelerate import init_empty_weights

    import lorafuse

    hf_config = transformers.AutoConfig.from_pretrained(src)
    architectures = getattr(hf_config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with init_empty_weights():  # parameters on the meta device: nothing allocated until each loads
        if model_class is not None:
            model = model_class(hf_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    paths = lorafuse.load_checkpoint(model, src, quantize=config)
    if not paths:
        raise ValueError(f"{src}: no Linear layer to quantize (all are kept dense, or the model has none)")
    lorafuse.save_checkpoint(model, dst)
    _copy_other_files(src, dst)
    return paths


def _copy_other_files(src: str, dst: str) -> None:
    """SRC's files other than the weights and config.json (the tokenizer, generation config, README ...) into DST."""
    import shutil

    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in _WEIGHT_FILES or name.endswith(".safetensors") or not os.path.isfile(path):
            continue
        shutil.copy2(path, os.path.join(dst, name))


def lq_lora_checkpoint(src: str, dst: str, args: argparse.Namespace) -> Any:
    """The ``quantize --method lq-lora`` command's work: SRC loaded dense, LQ-LoRA on every Linear layer but the
    kept-dense ones, the adapter saved as DST/adapter, the quantized base as DST/base (with SRC's other files).
    Returns the report."""
    import torch
    import transformers

    import lorafuse

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    keep = list(args.keep_dense)
    targets = sorted(
        {path.rsplit(".", 1)[-1] for path, m in model.named_modules()
         if type(m) is torch.nn.Linear and not any(path == k or path.endswith("." + k) for k in keep)}
    )  # fmt: skip
    if not targets:
        raise ValueError(f"{src}: no Linear layer to quantize (all are kept dense, or the model has none)")
    fisher = None
    if args.fisher:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        with open(args.fisher, encoding="utf-8") as f:
            ids = torch.tensor(tokenizer.encode(f.read()), dtype=torch.long)
        windows = [ids[i : i + 128] for i in range(0, max(1, len(ids) - 128), 128)][:32]
        batches = [{"input_ids": w[None], "labels": w[None]} for w in windows if len(w) > 1]
        fisher = lorafuse.quant.empirical_fisher(model, batches, targets)
    config = lorafuse.LqLoraConfig(
        budget_bits=args.budget, r=args.rank, target_modules=targets, fisher=fisher,
        compute_dtype=getattr(torch, args.compute_dtype) if args.compute_dtype else None,
    )  # fmt: skip
    report = lorafuse.lq_lora(model, config)
    os.makedirs(dst, exist_ok=True)
    lorafuse.save_adapter(model, os.path.join(dst, "adapter"))
    lorafuse.unload(model)
    lorafuse.save_checkpoint(model, os.path.join(dst, "base"))
    _copy_other_files(src, os.path.join(dst, "base"))
    return report


def _quantize_command(args: argparse.Namespace) -> int:
    import torch

    import lorafuse

    try:
        if args.method == "lq-lora":
            report = lq_lora_checkpoint(args.src, args.dst, args)
            print(report.summary())
            print(f"lorafuse quantize: {len(report.matrices)} Linear layers by LQ-LoRA: the base in "
                  f"{os.path.join(args.dst, 'base')}, the adapter in {os.path.join(args.dst, 'adapter')}")
            return 0
        config = lorafuse.QuantConfig(
            quant_type=args.method,
            blocksize=args.blocksize,
            double_quant=not args.no_double_quant,
            compute_dtype=getattr(torch, args.compute_dtype) if args.compute_dtype else None,
            modules_to_not_convert=args.keep_dense,
        )
        paths = quantize_checkpoint(args.src, args.dst, config)
    except (ValueError, TypeError, OSError) as e:
        print(f"lorafuse quantize: {e}", file=sys.stderr)
        return 1
    print(
        f"lorafuse quantize: {len(paths)} Linear layers in {args.method.upper()} (blocksize {config.blocksize}), "
        f"written to {args.dst}"
    )
    return 0


def _inspect_command(folder: str, as_json: bool) -> int:
    try:
        try:
            report = inspect_adapter(folder)
        except (ValueError, OSError) as e:  # read_adapter's ValueErrors name the file and what is wrong
            return _invalid(folder, str(e), as_json)
        except Exception as e:  # not an invalid-adapter error: a bug; still no traceback for the user
            message = f"{type(e).__name__}: {e}"
            print(
                f"lorafuse inspect: internal error while reading {folder!r} (please report it): {message}",
                file=sys.stderr,
            )
            if as_json:
                _print_json({"folder": folder, "valid": False, "error": message})
            return 1
        if as_json:
            _print_json(report)
        else:
            _print_text(report)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `lorafuse inspect DIR | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _invalid(folder: str, message: str, as_json: bool) -> int:
    if as_json:
        _print_json({"folder": folder, "valid": False, "error": message})
    print(f"lorafuse inspect: invalid adapter: {message}", file=sys.stderr)
    return 1


# ---- the description ----------------------------------------------------------------------------------


def _scale(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _dtype_name(t: Any) -> str:
    return str(t.dtype).replace("torch.", "")


def inspect_adapter(folder: str) -> Dict[str, Any]:
    """The description of the adapter in ``folder`` (what ``lorafuse inspect --json`` prints).

    Raises:
        InvalidAdapter, ValueError: the folder does not hold a valid adapter (the message says why).
    """
    if not os.path.exists(folder):
        raise InvalidAdapter(
            f'"{folder}" does not exist; expected a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}'
        )
    if not os.path.isdir(folder):
        raise InvalidAdapter(
            f'"{folder}" is a file, not a folder; expected the folder holding {CONFIG_FILE} and '
            f"{WEIGHTS_FILE}"
        )

    import lorafuse  # torch comes in only here, through lorafuse

    adapter = lorafuse.read_adapter(folder)
    config = adapter["config"]
    if json.loads(adapter["config_json"]).get("target_modules") is None:
        config = dict(config, target_modules=None)  # the file names none: its layers are the targets
    use_rslora = bool(config["use_rslora"])

    # lora_alpha of each module: config.lora_alpha, unless alpha_pattern names it. The pattern rule is the
    # C++ one (LoraConfig::adapter_for), applied by the load planner to the file's own modules.
    alphas = {path: float(config["lora_alpha"]) for path, _, _ in adapter["layers"]}
    if config["alpha_pattern"]:
        embeddings = adapter["embeddings"]
        infos = [
            (path, "Linear", path not in embeddings, int(a.shape[1]), int(b.shape[0]), path in embeddings, False, False,
             False)
            for path, a, b in adapter["layers"]
        ] + [(path, "Module", False, -1, -1, False, False, False, False) for path, _ in adapter["saved_modules"]]
        plan = lorafuse._C._plan_adapter_load(folder, infos, True)
        for index, options, *_ in plan["targets"]:
            alphas[infos[index][0]] = float(json.loads(options)["lora_alpha"])

    tensors: List[Dict[str, Any]] = []
    layers: List[Dict[str, Any]] = []
    elements = {"lora_A": 0, "lora_B": 0, "bias": 0}
    for path, a, b in adapter["layers"]:
        for kind, t in (("lora_A", a), ("lora_B", b)):
            tensors.append(
                {
                    "name": f"{PREFIX}{path}.{kind}.weight",
                    "kind": kind,
                    "shape": list(t.shape),
                    "dtype": _dtype_name(t),
                    "elements": int(t.numel()),
                }
            )
            elements[kind] += int(t.numel())
        r = int(a.shape[0])
        alpha = alphas[path]
        layers.append(
            {
                "module": path,
                "rank": r,
                "in_features": int(a.shape[1]),
                "out_features": int(b.shape[0]),
                "lora_alpha": alpha,
                "scale": _scale(r, alpha, use_rslora),
            }
        )
    for path, t in adapter["biases"]:
        tensors.append(
            {
                "name": PREFIX + path,
                "kind": "bias",
                "shape": list(t.shape),
                "dtype": _dtype_name(t),
                "elements": int(t.numel()),
            }
        )
        elements["bias"] += int(t.numel())

    # The effective scale of each (rank, lora_alpha) in use, with how many modules have it.
    scales: Dict[tuple, int] = {}
    for layer in layers:
        key = (layer["rank"], layer["lora_alpha"])
        scales[key] = scales.get(key, 0) + 1
    by_name: Dict[str, int] = {}
    for layer in layers:
        name = layer["module"].rsplit(".", 1)[-1]
        by_name[name] = by_name.get(name, 0) + 1

    warnings = list(adapter["warnings"]) + _target_warnings(
        lorafuse, config, [p for p, _, _ in adapter["layers"]], adapter["embeddings"]
    )
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    try:
        base_model = json.loads(adapter["config_json"]).get("base_model_name_or_path")
    except ValueError:
        base_model = None

    return {
        "folder": folder,
        "config": {field: config[field] for field in CONFIG_FIELDS},
        "base_model_name_or_path": base_model,
        "scaling": "lora_alpha / sqrt(r)" if use_rslora else "lora_alpha / r",
        "scales": [
            {"rank": r, "lora_alpha": alpha, "scale": _scale(r, alpha, use_rslora), "modules": count}
            for (r, alpha), count in sorted(scales.items())
        ],
        "tensors": tensors,
        "layers": layers,
        "targets": {"modules": [layer["module"] for layer in layers], "by_name": by_name},
        "parameters": {"total": sum(elements.values()), **elements},
        "files": files,
        "warnings": warnings,
        "valid": True,
    }


def _target_warnings(lorafuse: Any, config: Dict[str, Any], paths: List[str], embeddings: List[str]) -> List[str]:
    """Where adapter_config.json's target_modules/exclude_modules and the file's modules disagree (PEFT's
    from_pretrained injects LoRA where the config says, so it would skip the file's other modules and leave
    the config's extra targets untrained). The selection rule is the C++ one (lorafuse::select_targets)."""
    if config["target_modules"] is None:  # PEFT picks by model type; the file's modules are the targets
        return []
    what = f"{CONFIG_FILE}: target_modules {json.dumps(config['target_modules'])}"
    if config["exclude_modules"] is not None:
        what += f" with exclude_modules {json.dumps(config['exclude_modules'])}"
    try:
        embeddings = set(embeddings)
        rows = [(p, "Linear", p not in embeddings, -1, -1, p in embeddings, False, False, False) for p in paths]
        # the modules kept whole (modules_to_save) are no LoRA layers of the file: only the targets are compared here
        lora_only = dict(config, modules_to_save=None, task_type=None)
        chosen, _, unmatched = lorafuse._C._select_targets(rows, json.dumps(lora_only))
    except ValueError as e:  # e.g. names that match none of the file's modules
        return [f"{what} does not fit the modules in {WEIGHTS_FILE} ({e})"]
    # entries that match none of the file's modules
    warnings = [f"{what} does not fit the modules in {WEIGHTS_FILE} ({w})" for w in unmatched]
    selected = {paths[index] for index, _ in chosen}
    skipped = [p for p in paths if p not in selected]
    if not skipped:
        return warnings
    shown = ", ".join(f'"{p}"' for p in skipped[:3]) + (
        f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    )
    return warnings + [
        f"{what} does not select {len(skipped)} of the {len(paths)} modules in {WEIGHTS_FILE} ({shown}); "
        "PEFT's from_pretrained would not load their weights"
    ]


# ---- printing -----------------------------------------------------------------------------------------


def _print_json(value: Dict[str, Any]) -> None:
    print(json.dumps(value, indent=2))


def _number(x: Any) -> str:
    """8.0 → "8", 0.05 → "0.05", 1/3 → "0.333333"."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


def _value(x: Any) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return _number(x)
    return json.dumps(x)  # as adapter_config.json writes it: null, true, ["q_proj", "v_proj"], {}


def _table(header: Sequence[str], rows: List[Sequence[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _times() -> str:
    """The multiplication sign where stdout can print it."""
    try:
        "\u00d7".encode(sys.stdout.encoding or "ascii")
        return "\u00d7"
    except (UnicodeEncodeError, LookupError):
        return "x"


def _print_text(report: Dict[str, Any]) -> None:
    out: List[str] = [f"adapter folder: {report['folder']}", ""]

    config = report["config"]
    out.append("config:")
    width = max(len(f) for f in CONFIG_FIELDS)
    for field in CONFIG_FIELDS:
        value = _value(config[field])
        if field == "target_modules" and config[field] is None:
            value += "  (not set in the file: the adapted modules are the file's)"
        out.append(f"  {field.ljust(width)}  {value}")
    if report["base_model_name_or_path"]:
        out.append(f"  {'base model'.ljust(width)}  {report['base_model_name_or_path']}")
    out.append("")

    out.append(f"effective scale ({report['scaling']}):")
    out += _table(
        ["rank", "lora_alpha", "scale", "modules"],
        [
            [str(s["rank"]), _number(s["lora_alpha"]), _number(s["scale"]), str(s["modules"])]
            for s in report["scales"]
        ],
    )
    out.append("")

    out.append(f"tensors ({len(report['tensors'])}):")
    out += _table(
        ["name", "shape", "dtype"],
        [[t["name"], "[" + ", ".join(map(str, t["shape"])) + "]", t["dtype"]] for t in report["tensors"]],
    )
    out.append("")

    out.append(f"layers ({len(report['layers'])}):")
    out += _table(
        ["module", "rank", "in", "out", "lora_alpha", "scale"],
        [
            [
                layer["module"],
                str(layer["rank"]),
                str(layer["in_features"]),
                str(layer["out_features"]),
                _number(layer["lora_alpha"]),
                _number(layer["scale"]),
            ]
            for layer in report["layers"]
        ],
    )
    out.append("")

    targets = report["targets"]
    out.append(f"target modules ({len(targets['modules'])}):")
    out += [f"  {path}" for path in targets["modules"]]
    times = _times()
    out.append(
        "  by name: " + ", ".join(f"{name} {times}{count}" for name, count in targets["by_name"].items())
    )
    out.append("")

    params = report["parameters"]
    parts = [f"lora_A {params['lora_A']:,}", f"lora_B {params['lora_B']:,}"]
    if params["bias"]:
        parts.append(f"bias {params['bias']:,}")
    out.append(f"parameters: {params['total']:,} ({', '.join(parts)})")
    out.append("files:")
    out += _table(["file", "bytes"], [[name, f"{size:,}"] for name, size in report["files"].items()])
    out.append("")

    if report["warnings"]:
        out.append(f"warnings ({len(report['warnings'])}):")
        out += [f"  - {w}" for w in report["warnings"]]
    else:
        out.append("warnings: none")
    out.append("")
    out.append("valid")
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
