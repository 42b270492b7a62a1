"""Adapter files shared with the real PEFT package, both ways, and the C++ program that serves them; adapters
loaded and deleted while other threads run forward with theirs."""

import copy
import subprocess
import threading
import time

import pytest
import torch

import lorafuse
from cpp_tools import cpp_program
from hf_models import IDS, TINY_LLAMA, logits, tiny_llama

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (lorafuse.LoraConfig fields, the same as PEFT LoraConfig fields)
CONFIGS = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_linear_patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        rank_pattern={"down_proj": 2, "k_proj": 4},
        alpha_pattern={"o_proj": 3},
    ),
    "rslora_regex_exclude": dict(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=r".*\.(q_proj|up_proj|gate_proj)",
        exclude_modules=["gate_proj"],
    ),
}


def randomize(model, seed):
    """Non-zero B (and fresh A) in every lorafuse layer: a trained adapter, not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorafuse.lora_layers(model):
            for name in layer.adapters:
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def peft_adapter(base, config, seed):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lorafuse_adapter_loads_in_peft_with_the_same_outputs(tmp_path, name):
    base = tiny_llama(seed=3)
    ours = copy.deepcopy(base)
    lorafuse.inject_lora(ours, lorafuse.LoraConfig(**CONFIGS[name]))
    randomize(ours, seed=5)
    assert not torch.allclose(logits(ours), logits(base))  # the adapter changes the outputs
    lorafuse.save_adapter(ours, tmp_path / "adapter")

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    # PEFT adapted exactly our layers, with our ranks
    ours_layers = {path: layer.adapters["default"].r for path, layer in lorafuse.lora_layers(ours)}
    theirs_layers = {
        path.removeprefix("base_model.model."): m.r["default"]
        for path, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert theirs_layers == ours_layers


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_adapter_loads_in_lorafuse_with_the_same_outputs(tmp_path, name):
    base = tiny_llama(seed=4)
    theirs = peft_adapter(base, CONFIGS[name], seed=6)
    theirs.save_pretrained(tmp_path)

    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert lorafuse.active_adapter(ours) == "default"
    # loaded like an injected adapter: its A and B train, nothing else
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the tensors are PEFT's, bit for bit
    saved = safetensors_torch.load_file(tmp_path / "adapter_model.safetensors")
    for path, layer in lorafuse.lora_layers(ours):
        assert torch.equal(layer.lora_A["default"].weight, saved[f"base_model.model.{path}.lora_A.weight"])
        assert torch.equal(layer.lora_B["default"].weight, saved[f"base_model.model.{path}.lora_B.weight"])


def test_lorafuse_round_trip_and_a_second_adapter_beside_the_first(tmp_path):
    base = tiny_llama(seed=7)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lorafuse.inject_lora(a, lorafuse.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorafuse.inject_lora(b, lorafuse.LoraConfig(r=2, target_modules=["o_proj", "v_proj"]))
    randomize(a, 1)
    randomize(b, 2)
    lorafuse.save_adapter(a, tmp_path / "a")
    lorafuse.save_adapter(b, tmp_path / "b")

    model = copy.deepcopy(base)
    lorafuse.load_adapter(model, tmp_path / "a", "a", is_trainable=True)
    lorafuse.load_adapter(model, tmp_path / "b", "b")
    assert lorafuse.adapter_names(model) == ["a", "b"]
    assert lorafuse.active_adapter(model) == "a"  # the second waits
    torch.testing.assert_close(logits(model), logits(a), rtol=0, atol=0)
    for _, layer in lorafuse.lora_layers(model):
        if "b" in layer.adapters:
            assert not layer.lora_A["b"].weight.requires_grad and not layer.lora_B["b"].weight.requires_grad
    lorafuse.set_adapter(model, "b")
    torch.testing.assert_close(logits(model), logits(b), rtol=0, atol=0)
    want_a, want_base = logits(a), logits(base)  # outside the scopes: these models' adapter is "default"
    with lorafuse.use_adapter("a"):
        torch.testing.assert_close(logits(model), want_a, rtol=0, atol=0)
    with lorafuse.use_adapter(""):
        torch.testing.assert_close(logits(model), want_base, rtol=0, atol=0)


def test_bias_lora_only_round_trips_with_peft(tmp_path):
    # attention biases, so that there are biases to train
    base = tiny_llama(seed=8)
    import transformers

    torch.manual_seed(8)
    base = transformers.LlamaForCausalLM(
        base.config.__class__(**{**base.config.to_dict(), "attention_bias": True})
    )
    base.eval()
    ours = copy.deepcopy(base)
    lorafuse.inject_lora(
        ours, lorafuse.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only")
    )
    randomize(ours, 9)
    with torch.no_grad():
        for _, layer in lorafuse.lora_layers(ours):
            layer.base_layer.bias.add_(0.5)  # "trained" biases
    lorafuse.save_adapter(ours, tmp_path / "x")
    saved = safetensors_torch.load_file(tmp_path / "x" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in saved

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    back = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "x")
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=0)


def _saved_config(folder) -> dict:
    import json

    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", peft.TaskType.CAUSAL_LM, "FEATURE_EXTRACTION", None])
def test_task_type_is_accepted_saved_and_read_as_peft_does(tmp_path, task_type):
    """PEFT recipes write LoraConfig(task_type=...): lorafuse takes it (a str or peft.TaskType), saves it in
    adapter_config.json, PEFT loads the file into the model class of that task, and lorafuse reads it back and
    saves it again; it changes no output."""
    base = tiny_llama(seed=11)
    ours = copy.deepcopy(base)
    config = lorafuse.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type=task_type)
    expected = None if task_type is None else str(getattr(task_type, "value", task_type))
    assert config.task_type == expected
    lorafuse.inject_lora(ours, config)
    randomize(ours, seed=12)
    assert {layer.adapters["default"].task_type for _, layer in lorafuse.lora_layers(ours)} == {expected}
    lorafuse.save_adapter(ours, tmp_path / "a")
    assert _saved_config(tmp_path / "a")["task_type"] == expected

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert theirs.peft_config["default"].task_type == expected
    if expected == "CAUSAL_LM":
        assert isinstance(theirs, peft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    back = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert lorafuse.read_adapter(str(tmp_path / "a"))["config"]["task_type"] == expected
    lorafuse.save_adapter(back, tmp_path / "b")
    assert _saved_config(tmp_path / "b")["task_type"] == expected
    torch.testing.assert_close(logits(back), logits(ours), rtol=0, atol=0)


def test_a_peft_causal_lm_adapter_keeps_its_task_type_through_lorafuse(tmp_path):
    base = tiny_llama(seed=13)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    lorafuse.save_adapter(ours, tmp_path / "again")
    assert _saved_config(tmp_path / "again")["task_type"] == "CAUSAL_LM"
    converted = lorafuse.from_peft(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, task_type="CAUSAL_LM")))
    assert {layer.adapters["default"].task_type for _, layer in lorafuse.lora_layers(converted)} == {"CAUSAL_LM"}


@pytest.mark.parametrize(
    "task_type, error, parts",
    [
        ("causal_lm", ValueError, ["task_type", "expected one of PEFT's task types", 'found "causal_lm"']),
        (3, TypeError, ["task_type", "expected a str", "found int"]),
    ],
)
def test_bad_task_types_are_refused_by_name(task_type, error, parts):
    with pytest.raises(error) as raised:
        lorafuse.LoraConfig(task_type=task_type)
    for part in parts:
        assert part in str(raised.value)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_from_peft_keeps_the_bias_mode_so_trained_biases_are_saved(tmp_path, bias):
    """A PEFT model with bias="lora_only"/"all" trains biases; after from_peft they are still trained and
    save_adapter must save them, as PEFT's save_pretrained does."""
    import transformers

    torch.manual_seed(14)
    base = transformers.LlamaForCausalLM(
        tiny_llama(seed=14).config.__class__(**{**tiny_llama(seed=14).config.to_dict(), "attention_bias": True})
    ).eval()
    theirs = peft_adapter(base, dict(r=4, target_modules=["q_proj", "v_proj"], bias=bias), seed=15)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.25)  # "trained" biases
    want = logits(theirs)
    ours = lorafuse.from_peft(theirs)
    assert {layer.adapters["default"].bias for _, layer in lorafuse.lora_layers(ours)} == {bias}
    lorafuse.save_adapter(ours, tmp_path / "a")
    assert _saved_config(tmp_path / "a")["bias"] == bias
    back = lorafuse.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(back), want, rtol=1e-5, atol=1e-5)


def test_peft_adapters_load_in_a_cpp_program_with_the_reference_llama(tmp_path):
    program = cpp_program()
    base = tiny_llama(seed=10)
    safetensors_torch.save_file(
        {n: p.detach().contiguous() for n, p in base.named_parameters()}, tmp_path / "base.st"
    )
    safetensors_torch.save_file({"input_ids": IDS.to(torch.int64).contiguous()}, tmp_path / "ids.st")
    expected = {"base": logits(base)}
    args = []
    for i, name in enumerate(["q_v", "all_linear_patterns", "rslora_regex_exclude"]):
        theirs = peft_adapter(base, CONFIGS[name], seed=20 + i)
        theirs.save_pretrained(tmp_path / name)
        expected[name] = logits(theirs)
        args.append(f"{name}={tmp_path / name}")
    t = TINY_LLAMA
    config = ",".join(
        str(t[k])
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    )
    out = tmp_path / "logits.st"
    run = subprocess.run(
        [
            program,
            "--base",
            tmp_path / "base.st",
            "--ids",
            tmp_path / "ids.st",
            "--out",
            out,
            "--config",
            config,
        ]
        + args,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = safetensors_torch.load_file(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-4, msg=name)
    assert not torch.allclose(got["q_v"], got["base"])


def test_cpp_serving_program_runs_peft_adapters_in_mixed_batches_while_loading_more(tmp_path):
    """examples/serve_mixed.cpp (lorafuse_serve_mixed): PEFT-saved adapters served from the reference Llama in mixed
    batches while a second thread loads one more; every row of the last batch equals PEFT's model for that row's
    adapter, and the program reports its throughput."""
    program = cpp_program("lorafuse_serve_mixed")
    base = tiny_llama(seed=10)
    safetensors_torch.save_file(
        {n: p.detach().contiguous() for n, p in base.named_parameters()}, tmp_path / "base.st"
    )
    ids = torch.arange(30).mul(7).remainder(64).reshape(5, 6)
    safetensors_torch.save_file({"input_ids": ids.contiguous()}, tmp_path / "ids.st")
    expected = {"__base__": logits(base, ids)}
    names = ["q_v", "all_linear_patterns", "rslora_regex_exclude"]
    for i, name in enumerate(names):
        theirs = peft_adapter(base, CONFIGS[name], seed=30 + i)
        theirs.save_pretrained(tmp_path / name)
        expected[name] = logits(theirs, ids)
    t = TINY_LLAMA
    config = ",".join(str(t[k]) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads"))
    run = subprocess.run(
        [program, "--base", tmp_path / "base.st", "--config", config, "--ids", tmp_path / "ids.st", "--out",
         tmp_path / "rows.st", "--seconds", "0.5", f"q_v={tmp_path / 'q_v'}",
         f"all_linear_patterns={tmp_path / 'all_linear_patterns'}", "--late",
         f"rslora_regex_exclude={tmp_path / 'rslora_regex_exclude'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "loaded rslora_regex_exclude while serving" in run.stdout
    assert "tokens/s" in run.stdout and "one forward per adapter" in run.stdout
    got = safetensors_torch.load_file(tmp_path / "rows.st")
    assert len(got) == 5
    seen = set()
    for key, row in got.items():
        index, name = key.split(".", 1)
        seen.add(name)
        torch.testing.assert_close(row, expected[name][int(index[3:])], rtol=1e-4, atol=1e-4, msg=key)
    assert seen == {"__base__", *names}  # the late adapter joined the batches


def test_cpp_program_reports_a_bad_adapter(tmp_path):
    program = cpp_program()
    base = tiny_llama(seed=11)
    safetensors_torch.save_file(
        {n: p.detach().contiguous() for n, p in base.named_parameters()}, tmp_path / "base.st"
    )
    safetensors_torch.save_file({"input_ids": IDS.to(torch.int64).contiguous()}, tmp_path / "ids.st")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "lora_bias": true}')
    run = subprocess.run(
        [
            program,
            "--base",
            tmp_path / "base.st",
            "--ids",
            tmp_path / "ids.st",
            "--out",
            tmp_path / "o.st",
            "--config",
            "64,32,48,2,4,2",
            f"x={tmp_path / 'bad'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "lora_bias" in run.stderr and "Traceback" not in run.stderr


def _hot_swap(model, tmp_path, rounds, run=logits):
    """Threads run forward with fixed adapters "a" and "b" (and the base), and a mixed batch (one adapter per row:
    "b" then "a"), while this thread loads and deletes other adapters in a loop; returns the mismatches seen and the
    load times."""
    serving = ("a", "b", "", ("b", "a"))
    references = {}
    for name in serving:
        with lorafuse.use_adapter(list(name) if isinstance(name, tuple) else name):
            references[name] = run(model)
    assert not torch.equal(references["a"], references["b"])
    stop = threading.Event()
    errors = []
    counts = {}

    def serve(name):
        n = 0
        try:
            while not stop.is_set():
                with lorafuse.use_adapter(list(name) if isinstance(name, tuple) else name):
                    out = run(model)
                if not torch.equal(out, references[name]):
                    errors.append(f"{name}: max diff {(out - references[name]).abs().max().item()}")
                n += 1
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(f"{name}: {type(e).__name__}: {e}")
        counts[name] = n

    threads = [threading.Thread(target=serve, args=(n,)) for n in serving]
    for t in threads:
        t.start()
    times = []
    try:
        for i in range(rounds):
            start = time.perf_counter()
            lorafuse.load_adapter(model, tmp_path / ("c" if i % 2 else "d"), f"swap{i}")
            times.append(time.perf_counter() - start)
            if i >= 2:
                lorafuse.delete_adapter(model, f"swap{i - 2}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(counts.get(n, 0) > 0 for n in serving), counts
    # the mixed batch's rows are the single-adapter runs' rows
    torch.testing.assert_close(references[("b", "a")][0], references["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(references[("b", "a")][1], references["a"][1], rtol=1e-5, atol=1e-5)
    return errors, times


def test_hot_swap_under_load_python_model(tmp_path):
    base = tiny_llama(seed=12)
    for name, seed, targets in (
        ("a", 1, ["q_proj", "v_proj"]),
        ("b", 2, ["q_proj", "v_proj"]),
        ("c", 3, ["q_proj"]),
        ("d", 4, ["v_proj", "q_proj"]),
    ):
        m = copy.deepcopy(base)
        lorafuse.inject_lora(m, lorafuse.LoraConfig(r=4, target_modules=targets))
        randomize(m, seed)
        lorafuse.save_adapter(m, tmp_path / name)
    model = copy.deepcopy(base)
    lorafuse.load_adapter(model, tmp_path / "a", "a")
    lorafuse.load_adapter(model, tmp_path / "b", "b")
    errors, times = _hot_swap(model, tmp_path, rounds=100)
    assert errors == []
    assert lorafuse.adapter_names(model) == ["a", "b", "swap98", "swap99"]
    # loading does not slow down as adapters come and go: the last loads take about as long as the first
    first, last = sorted(times[:10])[5], sorted(times[-10:])[5]
    assert last < 3 * first + 0.02, (first, last)


def test_hot_swap_under_load_cpp_model(tmp_path):
    base = lorafuse.models.Llama(lorafuse.models.LlamaConfig(**TINY_LLAMA))
    base.eval()
    hf = tiny_llama(seed=13)
    with torch.no_grad():
        hf_params = dict(hf.named_parameters())
        for n, p in base.named_parameters():
            p.copy_(hf_params[n])
    for name, seed, targets in (
        ("a", 1, ["q_proj", "v_proj"]),
        ("b", 2, ["q_proj", "v_proj"]),
        ("c", 3, ["q_proj"]),
        ("d", 4, ["v_proj", "q_proj"]),
    ):
        m = copy.deepcopy(hf)
        lorafuse.inject_lora(m, lorafuse.LoraConfig(r=4, target_modules=targets))
        randomize(m, seed)
        lorafuse.save_adapter(m, tmp_path / name)
    lorafuse.load_adapter(base, tmp_path / "a", "a")
    lorafuse.load_adapter(base, tmp_path / "b", "b")

    def cpp_logits(model):  # the C++ model takes ids and returns logits
        with torch.no_grad():
            return model(IDS)

    errors, times = _hot_swap(base, tmp_path, rounds=60, run=cpp_logits)
    assert errors == []
    assert lorafuse.adapter_names(base) == ["a", "b", "swap58", "swap59"]


def _two_adapters(tmp_path):
    """A model with adapter "a" on q_proj only and "c" on v_proj only; a file "b" for q_proj and v_proj."""
    base = tiny_llama(seed=14)
    for name, targets, seed in (("a", ["q_proj"], 1), ("c", ["v_proj"], 2), ("b", ["q_proj", "v_proj"], 3)):
        m = copy.deepcopy(base)
        lorafuse.inject_lora(m, lorafuse.LoraConfig(r=4, target_modules=targets))
        randomize(m, seed)
        lorafuse.save_adapter(m, tmp_path / name)
    model = copy.deepcopy(base)
    lorafuse.load_adapter(model, tmp_path / "a", "a")
    lorafuse.load_adapter(model, tmp_path / "c", "c")  # v_proj layers: "c" there, none active
    return model


@pytest.mark.parametrize("cpp", [False, True], ids=["python_model", "cpp_model"])
def test_loading_beside_others_activates_nothing(tmp_path, cpp):
    model = _two_adapters(tmp_path)
    if cpp:
        hf = model
        model = lorafuse.models.Llama(lorafuse.models.LlamaConfig(**TINY_LLAMA))
        model.eval()
        with torch.no_grad():
            params = dict(tiny_llama(seed=14).named_parameters())
            for n, p in model.named_parameters():
                p.copy_(params[n])
        lorafuse.load_adapter(model, tmp_path / "a", "a")
        lorafuse.load_adapter(model, tmp_path / "c", "c")
        del hf

    def run():
        with torch.no_grad():
            return model(IDS) if cpp else logits(model)

    before = run()
    trainable = lorafuse.trainable_parameters(model)[0]
    lorafuse.load_adapter(model, tmp_path / "b", "b")
    assert torch.equal(run(), before)  # the default forward is unchanged
    assert lorafuse.trainable_parameters(model)[0] == trainable
    assert lorafuse.active_adapter(model) == "a"


def test_scopes_closed_out_of_order_remove_only_themselves():
    base = tiny_llama(seed=15)
    model = copy.deepcopy(base)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, target_modules=["q_proj"]), "b")
    randomize(model, 3)
    want = {}
    for name in ("a", "b", ""):
        with lorafuse.use_adapter(name):
            want[name] = logits(model)

    def stream(name):
        with lorafuse.use_adapter(name):
            while True:
                yield logits(model)

    g1, g2 = stream("a"), stream("b")
    assert torch.equal(next(g1), want["a"])
    assert torch.equal(next(g2), want["b"])
    g1.close()  # closes "a" while "b" is open above it
    assert torch.equal(next(g2), want["b"])
    g2.close()
    lorafuse.set_adapter(model, "a")
    assert torch.equal(logits(model), want["a"])  # no scope left open


def test_a_warning_turned_error_leaves_a_cpp_model_unchanged(tmp_path):
    hf = tiny_llama(seed=16)
    lorafuse.inject_lora(hf, lorafuse.LoraConfig(r=4))  # lora_B all zeros: loading warns
    lorafuse.save_adapter(hf, tmp_path / "z")
    model = lorafuse.models.Llama(lorafuse.models.LlamaConfig(**TINY_LLAMA))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="all zeros"):
            lorafuse.load_adapter(model, tmp_path / "z", "z")
    assert lorafuse.adapter_names(model) == []
    with pytest.warns(UserWarning, match="all zeros"):
        lorafuse.load_adapter(model, tmp_path / "z", "z")
    assert lorafuse.adapter_names(model) == ["z"]


def test_use_adapter_on_a_merged_layer(tmp_path):
    model = tiny_llama(seed=17)
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    randomize(model, 4)
    want = logits(model)
    lorafuse.merge(model)
    with lorafuse.use_adapter("a"):
        torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    for name in ("", "other"):
        with lorafuse.use_adapter(name), pytest.raises(ValueError, match="merged into its weight"):
            logits(model)


def test_rank_pattern_keys_keep_their_file_order(tmp_path):
    # PEFT takes the first rank_pattern key that matches, in file order: here "q_proj" (rank 4) first.
    base = tiny_llama(seed=18)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=2,
            target_modules=["q_proj"],
            rank_pattern={"q_proj": 4, "model.layers.0.self_attn.q_proj": 2},
            init_lora_weights=False,
        ),
    ).eval()
    theirs.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 4, "model.layers.0.self_attn.q_proj": 2}  # in this order
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, sort_keys=False))
    ours = lorafuse.load_adapter(copy.deepcopy(base), tmp_path)
    assert {layer.adapters["default"].r for _, layer in lorafuse.lora_layers(ours)} == {4}
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
