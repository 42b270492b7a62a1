"""scripts/bench.py (and scripts/bench_lora_linear.py, whose layer-level code it reuses).

A quick CPU run as a subprocess writes one complete JSON report (every variant, positive medians, ratios
that follow from the medians, metadata) and its plots; a lorafuse that computes a wrong result makes the
correctness checks abort the run before anything is timed or written.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorafuse

pytest.importorskip("peft")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
LAYER_VARIANTS = ("lorafuse", "lorafuse_layer", "peft_chain", "peft")
MODEL_VARIANTS = ("lorafuse", "peft")
RESULT_NAME = re.compile(r"^\d{8}T\d{6}Z_[a-z0-9-]+_([0-9a-f]{7}|unknown)\.json$")


@pytest.fixture
def scripts(monkeypatch):
    """The benchmark scripts as modules (scripts/ on sys.path for this test)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench
    import bench_lora_linear

    return bench, bench_lora_linear


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
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
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
    assert "threads" in report["device"] and report["device"] in stdout
    assert report["torch_version"] == torch.__version__
    assert report["lorafuse_version"] == lorafuse.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", report["git_commit"]), report["git_commit"]
    assert path.name.endswith(f"_{report['git_commit'][:7]}.json")
    assert report["dtype"] == "float32"
    assert report["levels"] == ["layer", "model"] and report["quick"] is True
    assert report["date"] and report["peft_version"] and report["transformers_version"]
    for key in ("load_average_start", "load_average_end"):
        assert report[key] is None or (len(report[key]) == 3 and min(report[key]) >= 0)
    stem = path.name.removesuffix(".json")
    assert sorted(report["plots"]) == [f"{stem}_layer.png", f"{stem}_model.png"]
    for name in report["plots"]:
        png = path.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"quick run: {elapsed:.1f} s wall, {report['elapsed_s']} s inside the script")


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
        # the check ran: lorafuse against every other LoRA variant, output and each gradient
        assert set(row["check_rel_err"]) == {"lorafuse_layer", "peft_chain", "peft"}
        for errors in row["check_rel_err"].values():
            assert set(errors) == {"out", "dx", "dbias", "dlora_a", "dlora_b"}
            assert all(0 <= e <= 1e-4 for e in errors.values()), errors


def test_quick_run_model_level(quick_run):
    model = quick_run[0]["model"]
    assert [r["targets"] for r in model["results"]] == ["q_proj,v_proj", "all-linear"]
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
        assert row["ratio_tokens_per_s"] == pytest.approx(tps["lorafuse"] / tps["peft"], rel=1e-9)
        assert row["ratio_tokens_per_s"] == pytest.approx(med["peft"] / med["lorafuse"], rel=1e-9)
        check = row["check"]
        assert check["loss_lorafuse"] == pytest.approx(check["loss_peft"], rel=1e-5)
        assert 0 <= check["grad_max_rel_err"] <= 1e-3
        assert row["trainable_params"] > 0
        layers[row["targets"]] = row["adapted_layers"]
    n = model["config"]["num_hidden_layers"]
    assert layers == {"q_proj,v_proj": 2 * n, "all-linear": 7 * n}
    assert "not measured" in model["memory"]  # CPU memory per variant is off in a quick run


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


def test_bench_lora_linear_still_runs(scripts, tmp_path):
    _, bench_lora_linear = scripts
    out = tmp_path / "lora_linear.json"
    argv = ["--device", "cpu", "--tokens", "8", "--dims", "64", "--ranks", "4", "--repeats", "2"]
    argv += ["--warmup", "0", "--warmup-ms", "0", "--min-repeat-ms", "1", "--out", str(out)]
    assert bench_lora_linear.main(argv) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["benchmark"] == "lora_linear" and report["torch_version"] == torch.__version__
    (row,) = report["results"]
    for mode in ("forward", "fwd_bwd"):
        med = row["median_ms"][mode]
        for name in ("lorafuse", "peft_chain"):
            assert row["ratio"][mode][name] == pytest.approx(med[name] / med["base"])
    assert out.with_suffix(".png").exists()
