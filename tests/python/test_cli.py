"""The ``lorafuse inspect DIR`` command, run as a subprocess (``python -m lorafuse``) the way users run it.

Expected values come from the models and tensors the tests build (and from the reference safetensors
package), never from the CLI's own code.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import hf_models
import lorafuse
from lorafuse import cli

PREFIX = "base_model.model."
FILES = ("adapter_config.json", "adapter_model.safetensors")


def cli_env():
    """The environment of the subprocesses: they find lorafuse where this test process found it."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(lorafuse.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def run(*args, command=None):
    command = command or [sys.executable, "-m", "lorafuse"]
    return subprocess.run(
        [*command, *map(str, args)], env=cli_env(), capture_output=True, text=True, timeout=300
    )


def inspect_json(folder):
    result = run("inspect", folder, "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def expected_from_model(model, adapter_name="default"):
    """name → (shape, dtype) of every tensor the saved file must hold, and each module's rank, from the
    model's own LoRA weights."""
    tensors, ranks, elements = {}, {}, 0
    for path, layer in lorafuse.lora_layers(model):
        a = layer.lora_A[adapter_name].weight
        b = layer.lora_B[adapter_name].weight
        tensors[f"{PREFIX}{path}.lora_A.weight"] = (list(a.shape), str(a.dtype).replace("torch.", ""))
        tensors[f"{PREFIX}{path}.lora_B.weight"] = (list(b.shape), str(b.dtype).replace("torch.", ""))
        ranks[path] = a.shape[0]
        elements += a.numel() + b.numel()
    return {"tensors": tensors, "ranks": ranks, "elements": elements}


def make_adapter(folder, train=True, **config):
    """A tiny Llama with lorafuse LoRA (lora_B made non-zero when ``train``), saved to ``folder``."""
    pytest.importorskip("transformers")
    model = hf_models.tiny_llama()
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    options.update(config)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(**options))
    if train:
        torch.manual_seed(1)
        with torch.no_grad():
            for _, layer in lorafuse.lora_layers(model):
                layer.lora_B["default"].weight.normal_()
    lorafuse.save_adapter(model, folder)
    return expected_from_model(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "trained"
    return str(folder), make_adapter(folder)


# ---- valid adapters --------------------------------------------------------------------------------------


def test_inspect_prints_the_adapter(trained):
    folder, expected = trained
    result = run("inspect", folder)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    lines = out.splitlines()
    assert lines[0] == f"adapter folder: {folder}"
    assert lines[-1] == "valid"

    # the config, as saved
    assert re.search(r"^\s+r\s+4$", out, re.M)
    assert re.search(r"^\s+lora_alpha\s+8$", out, re.M)
    assert re.search(r'^\s+target_modules\s+\["q_proj", "v_proj"\]$', out, re.M)
    assert re.search(r'^\s+bias\s+"none"$', out, re.M)
    assert re.search(r"^\s+use_rslora\s+false$", out, re.M)
    # the effective scale of rank 4: lora_alpha 8 / r 4, for the 4 modules
    assert re.search(r"^\s+4\s+8\s+2\s+4$", out, re.M)

    # each tensor on its own line: name, shape, dtype
    assert len(expected["tensors"]) == 8
    for name, (shape, dtype) in expected["tensors"].items():
        shape_text = re.escape("[" + ", ".join(map(str, shape)) + "]")
        assert re.search(rf"^\s+{re.escape(name)}\s+{shape_text}\s+{dtype}$", out, re.M), name
    # each module with its rank, in and out features
    for path, rank in expected["ranks"].items():
        assert re.search(rf"^\s+{re.escape(path)}\s+{rank}\s+32\s+(32|16)\s+8\s+2$", out, re.M), path
    # targets, grouped by name
    assert "by name: q_proj \u00d72, v_proj \u00d72" in out or "by name: q_proj x2, v_proj x2" in out
    # parameter count and sizes on disk
    assert f"parameters: {expected['elements']:,} " in out
    for name in FILES:
        size = os.path.getsize(os.path.join(folder, name))
        assert re.search(rf"^\s+{re.escape(name)}\s+{size:,}$", out, re.M), name
    assert "warnings: none" in out


def test_inspect_json_has_the_right_numbers(trained):
    folder, expected = trained
    report = inspect_json(folder)
    assert report["valid"] is True
    assert report["folder"] == folder
    assert report["config"]["r"] == 4 and report["config"]["lora_alpha"] == 8
    assert report["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert report["config"]["exclude_modules"] is None
    assert report["config"]["init_lora_weights"] is True

    # the tensors: exactly the model's, by name, shape and dtype; and what the reference reader finds
    assert {t["name"]: (t["shape"], t["dtype"]) for t in report["tensors"]} == expected["tensors"]
    safetensors_torch = pytest.importorskip("safetensors.torch")
    in_file = safetensors_torch.load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert {n: list(t.shape) for n, t in in_file.items()} == {
        t["name"]: t["shape"] for t in report["tensors"]
    }
    assert sum(t.numel() for t in in_file.values()) == expected["elements"]

    assert {layer["module"]: layer["rank"] for layer in report["layers"]} == expected["ranks"]
    assert all(layer["scale"] == 8 / 4 for layer in report["layers"])
    assert report["scales"] == [{"rank": 4, "lora_alpha": 8, "scale": 2.0, "modules": 4}]
    assert sorted(report["targets"]["modules"]) == sorted(expected["ranks"])
    assert report["targets"]["by_name"] == {"q_proj": 2, "v_proj": 2}
    assert report["parameters"]["total"] == expected["elements"]
    assert report["parameters"]["bias"] == 0
    assert report["files"] == {name: os.path.getsize(os.path.join(folder, name)) for name in FILES}
    assert report["warnings"] == []


def test_inspect_scale_per_rank_with_patterns(tmp_path):
    # q_proj: r 4, lora_alpha 12 → 3; v_proj: r 2, lora_alpha 8 → 4
    expected = make_adapter(tmp_path / "a", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 12})
    report = inspect_json(tmp_path / "a")
    want = {path: (2, 8 / 2) if path.endswith("v_proj") else (4, 12 / 4) for path in expected["ranks"]}
    assert {layer["module"]: (layer["rank"], layer["scale"]) for layer in report["layers"]} == want
    assert {layer["module"]: layer["rank"] for layer in report["layers"]} == expected["ranks"]
    assert sorted((s["rank"], s["lora_alpha"], s["scale"], s["modules"]) for s in report["scales"]) == [
        (2, 8, 4.0, 2),
        (4, 12, 3.0, 2),
    ]
    assert report["parameters"]["total"] == expected["elements"]


def test_inspect_shows_the_dtype_in_the_file(tmp_path, trained):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "half"
    shutil.copytree(trained[0], folder)
    path = folder / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(path)
    halves = {n: t.to(torch.float16) if ".lora_B." in n else t for n, t in tensors.items()}
    safetensors_torch.save_file(halves, path, metadata={"format": "pt"})
    report = inspect_json(folder)
    assert {t["name"]: t["dtype"] for t in report["tensors"]} == {
        n: str(t.dtype).replace("torch.", "") for n, t in halves.items()
    }
    assert {t["dtype"] for t in report["tensors"]} == {"float32", "float16"}
    assert report["files"]["adapter_model.safetensors"] == os.path.getsize(path)


def test_inspect_adapter_saved_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = peft.get_peft_model(
        hf_models.tiny_llama(),
        peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "down_proj"],
            init_lora_weights=False,
            use_rslora=True,
        ),
    )
    model.save_pretrained(tmp_path / "peft")
    folder = tmp_path / "peft"

    text = run("inspect", folder)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[-1] == "valid"

    report = inspect_json(folder)
    in_file = safetensors_torch.load_file(folder / "adapter_model.safetensors")
    assert {t["name"]: (t["shape"], t["dtype"]) for t in report["tensors"]} == {
        n: (list(t.shape), str(t.dtype).replace("torch.", "")) for n, t in in_file.items()
    }
    assert report["parameters"]["total"] == sum(t.numel() for t in in_file.values())
    assert report["targets"]["by_name"] == {"q_proj": 2, "k_proj": 2, "down_proj": 2}
    assert all(layer["rank"] == 4 for layer in report["layers"]) and len(report["layers"]) == 6
    # use_rslora: lora_alpha / sqrt(r)
    assert report["scales"] == [{"rank": 4, "lora_alpha": 16, "scale": 16 / math.sqrt(4), "modules": 6}]
    assert report["config"]["init_lora_weights"] is False and report["config"]["use_rslora"] is True
    assert report["warnings"] == []


def test_inspect_fresh_adapter_warns_that_lora_b_is_zero(tmp_path):
    make_adapter(tmp_path / "fresh", train=False)
    result = run("inspect", tmp_path / "fresh")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "valid"
    assert "warnings (1):" in lines
    assert any("lora_B is all zeros in 4 of 4 modules" in line for line in lines)
    report = inspect_json(tmp_path / "fresh")
    assert len(report["warnings"]) == 1 and "lora_B is all zeros" in report["warnings"][0]


def test_inspect_warns_when_the_config_targets_other_modules(tmp_path, trained):
    # PEFT's from_pretrained injects by target_modules: q_proj only would drop the file's v_proj weights
    narrow = tmp_path / "narrow"
    shutil.copytree(trained[0], narrow)
    _edit_config(narrow, target_modules=["q_proj"])
    result = run("inspect", narrow)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "valid"
    report = inspect_json(narrow)
    assert len(report["warnings"]) == 1
    warning = report["warnings"][0]
    assert "does not select 2 of the 4 modules" in warning
    assert '"model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"' in warning
    assert 'q_proj"' not in warning.split("(", 1)[1]

    # a target the file has no weights for
    wide = tmp_path / "wide"
    shutil.copytree(trained[0], wide)
    _edit_config(wide, target_modules=["q_proj", "v_proj", "k_proj"])
    report = inspect_json(wide)
    assert len(report["warnings"]) == 1 and '"k_proj" matches no module' in report["warnings"][0]


def test_inspect_lists_biases(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(attention_bias=True))
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    with torch.no_grad():
        for _, layer in lorafuse.lora_layers(model):
            layer.lora_B["default"].weight.normal_()
    lorafuse.save_adapter(model, tmp_path / "bias")
    biases = {
        PREFIX + name: list(p.shape)
        for name, p in model.named_parameters()
        if name.endswith("q_proj.base_layer.bias")
    }
    assert len(biases) == 2
    report = inspect_json(tmp_path / "bias")
    assert {t["name"]: t["shape"] for t in report["tensors"] if t["kind"] == "bias"} == biases
    expected = expected_from_model(model)
    assert report["parameters"]["bias"] == sum(math.prod(s) for s in biases.values())
    assert report["parameters"]["total"] == expected["elements"] + report["parameters"]["bias"]


# ---- invalid adapters ------------------------------------------------------------------------------------


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_rank(folder):
    # one module's A and B at rank 3 (consistent with each other) while the config says r = 4
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = folder / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(path)
    a = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    b = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[a], tensors[b] = tensors[a][:3].contiguous(), tensors[b][:, :3].contiguous()
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


INVALID = {
    "missing_folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "missing_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    "missing_weights": (
        lambda f: (f / "adapter_model.safetensors").unlink(),
        "adapter_model.safetensors: missing",
    ),
    "malformed_json": (lambda f: (f / "adapter_config.json").write_text('{"r": 4,'), "not valid JSON"),
    "dora_without_magnitudes": (lambda f: _edit_config(f, use_dora=True), "use_dora = true"),
    "truncated_safetensors": (_truncate, "truncated"),
    "wrong_rank": (
        _wrong_rank,
        'module "model.layers.1.self_attn.v_proj" has rank 3 but adapter_config.json gives it r = 4',
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_inspect_invalid_adapter(tmp_path, trained, case):
    folder = tmp_path / case
    shutil.copytree(trained[0], folder)
    spoil, message = INVALID[case]
    spoil(folder)
    result = run("inspect", folder)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lorafuse inspect: invalid adapter: ")
    assert message in lines[0]


def test_inspect_a_file_instead_of_a_folder(trained):
    result = run("inspect", os.path.join(trained[0], "adapter_model.safetensors"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("lorafuse inspect: invalid adapter: ")
    assert "not a folder" in result.stderr and "adapter_config.json" in result.stderr


def test_inspect_json_invalid_adapter(tmp_path, trained):
    folder = tmp_path / "dora"
    shutil.copytree(trained[0], folder)
    _edit_config(folder, use_dora=True)
    result = run("inspect", folder, "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("lorafuse inspect: invalid adapter: ")
    report = json.loads(result.stdout)
    assert report["valid"] is False and "use_dora" in report["error"]


# ---- usage and entry points ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["inspect"], ["inspect", "x", "--bogus"], ["frobnicate"]])
def test_usage_errors_exit_2(args):
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: lorafuse" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_in_process(trained, capsys):
    assert cli.main(["inspect", trained[0], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == trained[1]["elements"]
    assert cli.main(["inspect", os.path.join(trained[0], "absent")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_python_m_lorafuse_cli(trained):
    result = run("inspect", trained[0], command=[sys.executable, "-m", "lorafuse.cli"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "valid"


def test_console_script(trained):
    script = shutil.which("lorafuse")
    if script is None:
        pytest.skip("no `lorafuse` command on PATH (installed by `pip install .`)")
    result = run("inspect", trained[0], "--json", command=[script])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parameters"]["total"] == trained[1]["elements"]


# ---- lorafuse quantize ----------------------------------------------------------------------------------------


def test_quantize_writes_a_4bit_checkpoint_that_transformers_loads(tmp_path, capsys):
    import transformers

    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(hidden_size=64, intermediate_size=128))
    src, dst = tmp_path / "dense", tmp_path / "nf4"
    dense.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"model": "a tokenizer"}')
    assert cli.main(["quantize", str(src), str(dst)]) == 0
    assert "14 Linear layers in NF4 (blocksize 64)" in capsys.readouterr().out
    assert (dst / "tokenizer.json").read_text() == '{"model": "a tokenizer"}'
    ids = torch.arange(12).reshape(2, 6)
    expected = lorafuse.quantize_model(transformers.LlamaForCausalLM.from_pretrained(src)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst).train()  # bitsandbytes' exact path
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
    # the options reach the file (bitsandbytes' CPU kernels decode blocks longer than a row wrongly: lorafuse loads it)
    assert cli.main(["quantize", str(src), str(tmp_path / "b128"), "--blocksize", "128", "--no-double-quant"]) == 0
    loaded = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(hidden_size=64, intermediate_size=128))
    lorafuse.load_checkpoint(loaded, tmp_path / "b128")
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.blocksize == 128 and not layer.double_quant


def test_quantize_errors_name_the_problem(tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "absent"), str(tmp_path / "out")]) == 1
    assert "lorafuse quantize:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", str(tmp_path)])
    assert e.value.code == 2
    import transformers

    transformers.LlamaForCausalLM(hf_models.tiny_llama_config()).save_pretrained(tmp_path / "dense")
    assert cli.main(["quantize", str(tmp_path / "dense"), str(tmp_path / "out"), "--blocksize", "100"]) == 1
    assert "blocksize" in capsys.readouterr().err


def test_quantize_nf3_and_lq_lora(tmp_path, capsys):
    """--method nf3: NF3 layers in lorafuse's layout, loaded back as they are; --method lq-lora: the base (Q, DST/base)
    and the adapter (starting at L1·L2, DST/adapter) load back into the same logits as the model lq_lora makes in
    memory."""
    import transformers

    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(hidden_size=64, intermediate_size=128))
    src = tmp_path / "dense"
    dense.save_pretrained(src)
    (src / "tokenizer.json").write_text('{"model": "a tokenizer"}')
    ids = torch.arange(12).reshape(2, 6)
    assert cli.main(["quantize", str(src), str(tmp_path / "nf3"), "--method", "nf3"]) == 0
    assert "14 Linear layers in NF3 (blocksize 64)" in capsys.readouterr().out
    loaded = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(hidden_size=64, intermediate_size=128))
    assert len(lorafuse.load_checkpoint(loaded, tmp_path / "nf3")) == 14
    assert loaded.model.layers[0].mlp.up_proj.nf_format == lorafuse.NfFormat(3, 64, 8, 256)
    expected = lorafuse.quantize_model(transformers.LlamaForCausalLM.from_pretrained(src),
                                       lorafuse.QuantConfig(quant_type="nf3")).eval()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected(input_ids=ids).logits)

    dst = tmp_path / "lq"
    argv = ["quantize", str(src), str(dst), "--method", "lq-lora", "--budget", "3", "--rank", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "LQ-LoRA: 14 matrices" in out and "allocation: optimal" in out and str(dst / "adapter") in out
    assert (dst / "base" / "tokenizer.json").is_file() and (dst / "adapter" / "adapter_config.json").is_file()
    reference = transformers.LlamaForCausalLM.from_pretrained(src)
    lorafuse.lq_lora(reference, lorafuse.LqLoraConfig(
        budget_bits=3.0, r=4, progress=False,
        target_modules=["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    ))  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_models.tiny_llama_config(hidden_size=64, intermediate_size=128))
    lorafuse.load_checkpoint(model, dst / "base")
    lorafuse.load_adapter(model, dst / "adapter")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
    bad = ["quantize", str(src), str(tmp_path / "bad"), "--method", "lq-lora", "--budget", "1", "--rank", "4"]
    assert cli.main(bad) == 1
    assert "budget_bits: 1 is below the smallest configuration's" in capsys.readouterr().err
