"""scripts/bench.py, with its layer level (scripts/bench_layer.py) and model level (scripts/bench_model.py).

A quick CPU run as a subprocess writes one complete JSON report (every variant, the frozen model's among
them, positive medians, ratios that follow from the medians, metadata) and its plots; a lorafuse that
computes a wrong result, or a frozen variant that is not the LoRA models' frozen base, makes the checks
abort the run before anything is timed or written.
"""

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lorafuse
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"
LAYER_VARIANTS = ("lorafuse", "lorafuse_layer", "peft_chain", "peft", "lorafuse_dora", "peft_dora")
MODEL_VARIANTS = ("frozen", "lorafuse", "peft")
MODEL_LORA_VARIANTS = ("lorafuse", "peft")
RESULT_NAME = re.compile(r"^\d{8}T\d{6}Z_[a-z0-9-]+_([0-9a-f]{7}|unknown)\.json$")


@pytest.fixture
def scripts(monkeypatch):
    """The benchmark's modules (scripts/ on sys.path for this test): bench.py and its model level."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_model

    import bench

    return bench, bench_model


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(lorafuse.__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    # one thread: a quick run stays quick on a machine whose cores are busy with other work
    cmd = [sys.executable, str(SCRIPTS / "bench.py"), "--quick", "--device", "cpu", "--threads", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text(encoding="utf-8")), files[0], proc.stdout, elapsed


def test_quick_run_metadata_and_file_names(quick_run):
    report, path, stdout, elapsed = quick_run
    assert RESULT_NAME.match(path.name), path.name
    assert report["device_type"] == "cpu"
    assert report["device"].endswith(", 1 thread") and report["device"] in stdout  # --threads 1
    assert report["cpu_threads"] == 1
    assert report["torch_version"] == torch.__version__
    assert report["lorafuse_version"] == lorafuse.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", report["git_commit"]), report["git_commit"]
    assert path.name.endswith(f"_{report['git_commit'][:7]}.json")
    assert report["dtype"] == "float32"
    assert report["levels"] == ["layer", "model", "qlora"] and report["quick"] is True
    assert report["date"] and report["peft_version"] and report["transformers_version"]
    for key in ("load_average_start", "load_average_end"):
        assert report[key] is None or (len(report[key]) == 3 and min(report[key]) >= 0)
    stem = path.name.removesuffix(".json")
    assert sorted(report["plots"]) == [f"{stem}_layer.png", f"{stem}_model.png", f"{stem}_qlora.png"]
    for name in report["plots"]:
        png = path.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"quick run: {elapsed:.1f} s wall, {report['elapsed_s']} s inside the script")


def test_quick_run_qlora_level(quick_run):
    qlora = quick_run[0]["qlora"]
    assert qlora["variants"] == ["lora", "base", "qlora", "bnb_peft"] and qlora["results"]
    assert qlora["compute_dtype"] == "float32"
    for row in qlora["results"]:
        assert row["status"] == "ok", row
        assert max(row["check_rel_err"].values()) <= 2e-4  # lorafuse's QLoRA layer = bitsandbytes + PEFT
        assert row["bnb_same_bytes"] is True  # the same NF4 bytes on the CPU
        assert row["bits_per_weight"] < 4.5
        for mode in ("forward", "fwd_bwd"):
            med = row["median_ms"][mode]
            assert all(v > 0 and math.isfinite(v) for v in med.values()), med
            for name in ("base", "qlora", "bnb_peft"):
                assert row["ratio_to_lora"][mode][name] == pytest.approx(med[name] / med["lora"], rel=1e-9)
    model = qlora["model"]
    assert model["variants"] == ["lora", "qlora", "bnb_peft"] and model["results"]
    for row in model["results"]:
        losses = row["losses"]
        assert losses["qlora"] == pytest.approx(losses["bnb_peft"], rel=1e-4)  # the same 4-bit model and adapters
        assert all(v > 0 and math.isfinite(v) for v in row["tokens_per_s"].values())
        assert 0 < row["model_bytes"]["nf4"] < row["model_bytes"]["float32"]
    loading = qlora["loading"]  # peak memory of loading a checkpoint each way, measured (values not asserted)
    assert set(loading["ways"]) == {"skeleton", "dense", "quantize_after", "quantize_loading", "load_4bit", "bnb_loading"}
    for way, row in loading["ways"].items():
        assert math.isfinite(row["peak_increase_mib"]), way
    assert loading["ways"]["quantize_loading"]["weights_mib"] < loading["ways"]["dense"]["weights_mib"] / 3


def test_quick_run_layer_level(quick_run):
    layer = quick_run[0]["layer"]
    assert layer["variants"] == ["base", *LAYER_VARIANTS]
    assert layer["results"]
    for row in layer["results"]:
        assert row["status"] == "ok", row
        assert row["tokens"] > 0 and row["d_in"] > 0 and row["d_out"] > 0 and row["rank"] > 0
        for mode in ("forward", "fwd_bwd"):
            med = row["median_ms"][mode]
            assert set(med) == {"base", *LAYER_VARIANTS}
            assert all(v > 0 and math.isfinite(v) for v in med.values()), med
            for name in LAYER_VARIANTS:
                assert row["ratio"][mode][name] == pytest.approx(med[name] / med["base"], rel=1e-9)
                assert len(row["samples_ms"][mode][name]) == layer["timing"]["repeats"]
        # the check ran: lorafuse against every other LoRA variant, lorafuse's DoRA against PEFT's, output and each
        # gradient (DoRA's magnitude too)
        assert set(row["check_rel_err"]) == {"lorafuse_layer", "peft_chain", "peft", "peft_dora"}
        for name, errors in row["check_rel_err"].items():
            dora = {"dmagnitude"} if name == "peft_dora" else set()
            assert set(errors) == {"out", "dx", "dbias", "dlora_a", "dlora_b"} | dora
            assert all(0 <= e <= 1e-4 for e in errors.values()), errors


def test_quick_run_model_level(quick_run):
    report, _, stdout, _ = quick_run
    model = report["model"]
    assert [r["targets"] for r in model["results"]] == ["q_proj,v_proj", "all-linear"]
    assert list(model["variants"]) == list(MODEL_VARIANTS)
    assert model["lora"]["r"] == 16
    tokens = model["config"]["batch"] * model["config"]["seq"]
    assert model["tokens_per_step"] == tokens
    layers = {}
    for row in model["results"]:
        assert row["status"] == "ok", row
        med, tps = row["median_ms"], row["tokens_per_s"]
        assert set(med) == set(tps) == set(MODEL_VARIANTS)
        for name in MODEL_VARIANTS:
            assert med[name] > 0 and math.isfinite(med[name])
            assert tps[name] == pytest.approx(tokens / (med[name] / 1e3), rel=1e-9)
            assert len(row["samples_ms"][name]) == model["timing"]["repeats"]
        assert row["ratio_tokens_per_s"] == pytest.approx(tps["lorafuse"] / tps["peft"], rel=1e-9)
        assert row["ratio_tokens_per_s"] == pytest.approx(med["peft"] / med["lorafuse"], rel=1e-9)
        check = row["check"]
        assert check["loss_lorafuse"] == pytest.approx(check["loss_peft"], rel=1e-5)
        assert 0 <= check["grad_max_rel_err"] <= 1e-3
        assert row["trainable_params"] > 0
        layers[row["targets"]] = row["adapted_layers"]
        # the frozen model: the same base (its loss is the lorafuse model's with adapters off), and each
        # LoRA variant's step time over its step, printed in the table as in the JSON
        assert check["loss_frozen"] == pytest.approx(check["loss_lorafuse_adapters_off"], rel=1e-5)
        assert 0 <= check["frozen_loss_rel_err"] <= 1e-5
        over = row["ratio_step_time_over_frozen"]
        assert set(over) == set(MODEL_LORA_VARIANTS)
        for name in MODEL_LORA_VARIANTS:
            assert over[name] == pytest.approx(med[name] / med["frozen"], rel=1e-9)
            assert over[name] == pytest.approx(tps["frozen"] / tps[name], rel=1e-9)
        table_row = re.search(
            rf"^ +{re.escape(row['targets'])} +{row['adapted_layers']} \|(.*)$", stdout, re.MULTILINE
        )
        assert table_row, stdout
        numbers = [float(x.replace(",", "")) for x in re.findall(r"[\d,]+\.?\d*", table_row.group(1))]
        assert numbers[3:6] == [
            pytest.approx(over["lorafuse"], abs=5e-4),
            pytest.approx(over["peft"], abs=5e-4),
            pytest.approx(row["ratio_tokens_per_s"], abs=5e-4),
        ], table_row.group(0)
    n = model["config"]["num_hidden_layers"]
    assert layers == {"q_proj,v_proj": 2 * n, "all-linear": 7 * n}
    assert "not measured" in model["memory"]  # CPU memory per variant is off in a quick run
    assert "step time / frozen" in stdout


def test_wrong_lorafuse_op_aborts_the_layer_level(scripts, monkeypatch, tmp_path):
    bench, _ = scripts
    real = lorafuse.lora_linear

    def off_by_one_percent(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0):
        return real(x, weight, bias, lora_a, lora_b, scale * 1.01, dropout_p)

    monkeypatch.setattr(lorafuse, "lora_linear", off_by_one_percent)
    argv = ["--level", "layer", "--quick", "--device", "cpu", "--tokens", "16", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"ABORT .*lorafuse does not match"):
        bench.main(argv)
    assert not list(tmp_path.iterdir())  # nothing timed, nothing written


def test_wrong_lorafuse_layer_aborts_the_model_level(scripts, monkeypatch, tmp_path):
    bench, _ = scripts
    real = lorafuse.nn.Linear.forward
    monkeypatch.setattr(lorafuse.nn.Linear, "forward", lambda self, x: real(self, x) * 1.01)
    argv = ["--level", "model", "--quick", "--device", "cpu", "--targets", "q_proj,v_proj"]
    with pytest.raises(SystemExit, match="ABORT at model level.*does not match the PEFT model"):
        bench.main([*argv, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(scripts, tmp_path):
    bench, _ = scripts
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.main(["--device", "cuda", "--quick", "--out", str(tmp_path)])


def test_frozen_variant_that_is_not_the_frozen_base_aborts_the_model_level(scripts, monkeypatch, tmp_path):
    bench, bench_model = scripts
    # frozen, but without the hook that lets backward run: the step would have nothing to differentiate
    monkeypatch.setattr(bench_model, "make_frozen", lambda model: model.requires_grad_(False))
    argv = ["--level", "model", "--quick", "--device", "cpu", "--targets", "q_proj,v_proj"]
    with pytest.raises(SystemExit, match="ABORT at model level.*frozen model's loss does not require grad"):
        bench.main([*argv, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.fixture
def tiny_llama(scripts):
    """(bench_model, its quick CPU config, a batch, a function building the Llama of a seed)."""
    _, bench_model = scripts
    cfg = bench_model.PRESETS[(True, "cpu")]
    ids = bench_model.make_batch(cfg, torch.device("cpu"), seed=1)

    def build(seed=0):
        return bench_model.build_llama(cfg, torch.device("cpu"), torch.float32, seed)

    return bench_model, cfg, ids, build


def test_frozen_step_runs_backward_to_the_embeddings_and_trains_nothing(tiny_llama):
    bench_model, _, ids, build = tiny_llama
    base = build()
    frozen = bench_model.make_frozen(copy.deepcopy(base))
    lf_model = bench_model.add_lorafuse(base, ["q_proj", "v_proj"], rank=4, dropout=0.0)
    assert not any(p.requires_grad for p in frozen.parameters())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    leaves = []
    frozen.get_input_embeddings().register_forward_hook(lambda _m, _i, out: leaves.append(out))
    step = bench_model.train_step(frozen, ids)
    step()
    step()
    # each step's backward reached the embeddings' output, and no weight got a gradient or changed
    assert len(leaves) == 2 and all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
    assert all(p.grad is None for p in frozen.parameters())
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    check = bench_model.check_frozen(frozen, lf_model, ids, torch.float32, "test")
    assert check["loss_frozen"] == pytest.approx(check["loss_lorafuse_adapters_off"], rel=1e-6)
    # the LoRA step next to it trains its adapters, and only them
    names = {n for n, p in lf_model.named_parameters() if p.requires_grad}
    assert names and names == {n for n, _ in lf_model.named_parameters() if ".lora_" in n}
    before = {k: v.clone() for k, v in lf_model.state_dict().items()}
    bench_model.train_step(lf_model, ids)()
    changed = {k for k, v in lf_model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)


def test_frozen_check_refuses_a_model_other_than_the_base(tiny_llama):
    bench_model, _, ids, build = tiny_llama
    other = bench_model.make_frozen(build(seed=1))  # other weights
    lf_model = bench_model.add_lorafuse(build(seed=0), "all-linear", rank=4, dropout=0.0)
    with pytest.raises(SystemExit, match="frozen model is not the LoRA models' frozen base"):
        bench_model.check_frozen(other, lf_model, ids, torch.float32, "test")


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_cpu_memory_probe_of_each_variant(tiny_llama, variant):
    bench_model, cfg, _, _ = tiny_llama
    spec = {"variant": variant, "config": cfg, "targets": "q_proj,v_proj", "rank": 4, "dropout": 0.0}
    spec.update(dtype="float32", seed=0, steps=1)
    result = bench_model.memory_probe(spec)
    assert result["steps"] == 1
    assert 0 < result["rss_after_build_mib"] <= result["peak_rss_mib"]
    assert result["peak_over_built_model_mib"] == pytest.approx(
        result["peak_rss_mib"] - result["rss_after_build_mib"], abs=0.11
    )


def test_cpu_memory_runs_the_probe_in_a_process_of_its_own(tiny_llama, monkeypatch):
    bench_model, cfg, _, _ = tiny_llama
    package_parent = str(Path(lorafuse.__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]))
    spec = {"variant": "frozen", "config": cfg, "targets": "all-linear", "rank": 4, "dropout": 0.0}
    spec.update(dtype="float32", seed=0, steps=1)
    result = bench_model.cpu_memory(spec)
    assert "error" not in result, result
    assert result["steps"] == 1 and result["peak_rss_mib"] >= result["rss_after_build_mib"] > 0
    # a probe that fails is reported, not raised: the run goes on without that number
    monkeypatch.setattr(bench_model, "__file__", str(SCRIPTS / "no_such_dir" / "bench_model.py"))
    bad = bench_model.cpu_memory(spec)
    assert bad["error"].startswith("memory probe failed (exit status 2") and "No such file" in bad["error"]
