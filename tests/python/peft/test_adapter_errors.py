"""Adapter folders that are wrong in every way a real one can be, loaded into a transformers Llama.

Each rejected folder must raise ValueError with a message that names the module or tensor (or file),
what was found and what was expected, and must leave the model exactly as it was (adapters, active
adapter, module tree, parameters, requires_grad, logits) -- on a model without LoRA and on one that
already has an adapter. Next to them: the folders that must load (round trip, PEFT's own files, a second
adapter, dtypes, partial loads, warnings), and a save killed at random moments over the same folder.
"""

import json
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import lorafuse

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from adapter_files import (  # noqa: E402  (after the importorskip)
    CONFIG,
    DELETE,
    PREFIX,
    Q0,
    Q1,
    QV,
    V0,
    V1,
    WEIGHTS,
    assert_unchanged,
    biased_llama,
    copy_folder,
    edit_config,
    lorafuse_adapter,
    peft_adapter,
    randomize,
    read_config,
    read_tensors,
    rewrite_tensors,
    snapshot,
    tensor_name,
    weights_path,
    write_tensors,
)
from hf_models import logits, tiny_llama  # noqa: E402


def rx(*parts: str) -> str:
    """A regex matching the literal ``parts`` in this order (anything between them)."""
    return ".*".join(re.escape(p) for p in parts)


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A lorafuse-saved adapter of tiny_llama(0): r=4 on q_proj and v_proj of both layers, random weights."""
    path = tmp_path_factory.mktemp("good") / "adapter"
    lorafuse_adapter(path)
    return str(path)


@pytest.fixture
def folder(tmp_path, good_dir):
    """A copy of the good adapter, to corrupt."""
    return copy_folder(good_dir, tmp_path / "adapter")


def make_model(kind: str):
    """tiny_llama(0) as it is ("bare"), or "with_adapter": with an adapter "first" (r=2 on q_proj and
    k_proj, random weights) that overlaps the file's layers in part."""
    m = tiny_llama(0)
    if kind == "with_adapter":
        lorafuse.inject_lora(m, lorafuse.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), "first")
        randomize(m, "first", seed=5)
    return m


@pytest.fixture(params=["bare", "with_adapter"])
def model(request):
    return make_model(request.param)


@pytest.fixture
def bare():
    """tiny_llama(0) without LoRA, for the large families of faults in the files themselves: those are
    found before the model is looked at (each family's single cases run on both kinds of model)."""
    return make_model("bare")


def expect_rejected(model, folder, match, *, in_file=True, adapter_name="default", partial=False):
    """load_adapter raises ValueError matching ``match`` and leaves ``model`` as it was. ``in_file``: the
    fault is in the folder itself, so read_adapter (no model) rejects it the same way; otherwise the folder
    is fine on its own and read_adapter accepts it."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as caught:
        lorafuse.load_adapter(model, folder, adapter_name, partial=partial)
    assert type(caught.value) is ValueError  # not a subclass such as UnicodeDecodeError
    assert_unchanged(model, before)
    if in_file:
        with pytest.raises(ValueError, match=match):
            lorafuse.read_adapter(folder)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert lorafuse.read_adapter(folder)["layers"]


def set_tensor(folder, module, which, value):
    rewrite_tensors(folder, lambda ts: ts.__setitem__(tensor_name(module, which), value))


def default_layers(model):
    """Paths of the layers that have adapter "default"."""
    return [p for p, layer in lorafuse.lora_layers(model) if "default" in layer.adapters]


# ---- shapes and ranks -----------------------------------------------------------------------------


SHAPES = [
    (Q0, "A", [4, 48], rx(f'"{Q0}"', "lora_A is [4, 48]", "takes 32 inputs", "expected [4, 32]")),
    (V0, "B", [40, 4], rx(f'"{V0}"', "lora_B is [40, 4]", "gives 16 outputs", "expected [16, 4]")),
    (Q1, "A", [4, 16], rx(f'"{Q1}"', "lora_A is [4, 16]", "takes 32 inputs", "expected [4, 32]")),
]


@pytest.mark.parametrize("module, which, shape, match", SHAPES, ids=["A_in", "B_out", "A_in_narrow"])
def test_shape_that_does_not_fit_the_base_layer(model, folder, module, which, shape, match):
    set_tensor(folder, module, which, torch.randn(shape))
    expect_rejected(model, folder, match, in_file=False)


def test_tensor_that_is_not_a_matrix(model, folder):
    set_tensor(folder, Q0, "A", torch.randn(128))
    name = tensor_name(Q0, "A")
    expect_rejected(model, folder, rx(WEIGHTS, f'"{name}" has shape [128]', "matrices", "lora_A [r, in]"))


def test_rank_in_the_file_differs_from_the_config(model, folder):
    g = torch.Generator().manual_seed(3)
    outs = {Q0: 32, V0: 16, Q1: 32, V1: 16}

    def rank_8(ts):
        for m, out in outs.items():
            ts[tensor_name(m, "A")] = torch.randn(8, 32, generator=g)
            ts[tensor_name(m, "B")] = torch.randn(out, 8, generator=g)

    rewrite_tensors(folder, rank_8)
    assert read_config(folder)["r"] == 4
    expect_rejected(model, folder, rx(WEIGHTS, f'module "{Q0}" has rank 8', "gives it r = 4", "disagree"))


def test_rank_pattern_differs_from_the_file(model, folder):
    edit_config(folder, rank_pattern={"v_proj": 8})
    expect_rejected(model, folder, rx(WEIGHTS, f'module "{V0}" has rank 4', "gives it r = 8", "rank_pattern"))


def test_rank_of_lora_A_and_lora_B_differ(model, folder):
    set_tensor(folder, Q0, "B", torch.randn(32, 8))
    expect_rejected(
        model,
        folder,
        rx(
            WEIGHTS,
            f'module "{Q0}"',
            "lora_A is [4, 32] (rank 4)",
            "lora_B is [32, 8]",
            "expected lora_B [out, 4]",
        ),
    )


@pytest.mark.parametrize("dropped", ["A", "B"])
def test_lora_A_without_lora_B(model, folder, dropped):
    rewrite_tensors(folder, lambda ts: ts.pop(tensor_name(V1, dropped)))
    kept = "B" if dropped == "A" else "A"
    expect_rejected(
        model, folder, rx(WEIGHTS, f'module "{V1}" has lora_{kept} but no lora_{dropped}', "both")
    )


# ---- modules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
def test_modules_in_the_file_that_the_model_lacks(model, folder, partial):
    absent = "model.layers.7.self_attn.q_proj"

    def rename(ts):
        for which in "AB":
            ts[tensor_name(absent, which)] = ts.pop(tensor_name(Q0, which))

    rewrite_tensors(folder, rename)
    match = rx("1 module(s) of the adapter file are not in the model", f'"{absent}"', "another model")
    expect_rejected(model, folder, match, in_file=False, partial=partial)


@pytest.mark.parametrize(
    "path, type_name, shape_a, shape_b",
    [("model.norm", "LlamaRMSNorm", [4, 32], [32, 4]), ("model.embed_tokens", "Embedding", [4, 64], [32, 4])],
    ids=["rmsnorm", "embedding"],
)
def test_module_that_is_not_a_linear(model, folder, path, type_name, shape_a, shape_b):
    """A Linear layer's tensors (lora_A.weight / lora_B.weight) for a module that is not one (an embedding's would be
    lora_embedding_A / _B)."""

    def add(ts):
        ts[tensor_name(path, "A")] = torch.randn(shape_a)
        ts[tensor_name(path, "B")] = torch.randn(shape_b)

    rewrite_tensors(folder, add)
    match = rx(f'"{path}"', "as a Linear layer (lora_A/B), which it is not", f"its type: {type_name}")
    expect_rejected(model, folder, match, in_file=False)


def drop_layer_1(ts):
    for m in (Q1, V1):
        for which in "AB":
            del ts[tensor_name(m, which)]


def test_targets_the_file_lacks_are_named(model, folder):
    rewrite_tensors(folder, drop_layer_1)
    match = rx("targets", "q_proj", "v_proj", "no weights for 2", f'"{Q1}", "{V1}"', "partial")
    expect_rejected(model, folder, match, in_file=False)


def test_partial_loads_only_the_layers_in_the_file(model, folder):
    written = rewrite_tensors(folder, drop_layer_1)
    had = lorafuse.adapter_names(model)
    lorafuse.load_adapter(model, folder, partial=True)
    assert default_layers(model) == [Q0, V0]
    assert lorafuse.adapter_names(model) == had + ["default"]
    layers = dict(lorafuse.lora_layers(model))
    for m in (Q0, V0):
        for which in "AB":
            loaded = getattr(layers[m], f"lora_{which}")["default"].weight
            assert torch.equal(loaded, written[tensor_name(m, which)]), (m, which)
    # layer 1's q_proj/v_proj stay plain Linear layers, or lorafuse layers without "default"
    assert all("default" not in layers[m].adapters for m in (Q1, V1) if m in layers)


# ---- dtypes ---------------------------------------------------------------------------------------


DTYPES = [
    (torch.float32, torch.float16, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.float64, torch.float32),
    (torch.bfloat16, torch.float64, torch.float32),
    (torch.float16, torch.float16, torch.float32),
    (torch.float64, torch.float32, torch.float64),
    (torch.float64, torch.bfloat16, torch.float64),
]


@pytest.mark.parametrize(
    "model_dtype, file_dtype, adapter_dtype", DTYPES, ids=[f"{str(m)[6:]}-{str(f)[6:]}" for m, f, _ in DTYPES]
)
def test_file_dtype_is_cast_to_the_adapter_dtype(folder, model_dtype, file_dtype, adapter_dtype):
    def cast(ts):
        for k in ts:
            ts[k] = ts[k].to(file_dtype)

    written = rewrite_tensors(folder, cast)
    assert all(t.dtype == file_dtype for t in read_tensors(folder).values())
    model = tiny_llama(0).to(model_dtype)
    lorafuse.load_adapter(model, folder)
    layers = dict(lorafuse.lora_layers(model))
    assert list(layers) == QV
    for m in QV:
        assert layers[m].base_layer.weight.dtype == model_dtype
        for which in "AB":
            loaded = getattr(layers[m], f"lora_{which}")["default"].weight
            assert loaded.dtype == adapter_dtype, (m, which)
            assert torch.equal(loaded, written[tensor_name(m, which)].to(adapter_dtype)), (m, which)


INT_DTYPES = [
    (torch.int32, "Int"),
    (torch.int64, "Long"),
    (torch.bool, "Bool"),
    (torch.uint8, "Byte"),
    (torch.float8_e4m3fn, "Float8_e4m3fn"),
]


@pytest.mark.parametrize("dtype, shown", INT_DTYPES, ids=[s for _, s in INT_DTYPES])
def test_tensor_of_a_non_float_dtype_is_rejected(bare, folder, dtype, shown):
    set_tensor(folder, Q0, "A", torch.ones(4, 32).to(dtype))
    name = tensor_name(Q0, "A")
    match = rx(WEIGHTS, f'"{name}" has dtype {shown}', "expected float32, float16, bfloat16 or float64")
    expect_rejected(bare, folder, match)


# ---- PEFT features lorafuse does not support ------------------------------------------------------


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


UNSUPPORTED = [
    ("lora_bias", True),
    ("layer_replication", [[0, 2]]),
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
]


@pytest.mark.parametrize("field, value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_config_feature_is_named(bare, folder, field, value):
    edit_config(folder, **{field: value})
    expect_rejected(bare, folder, rx(CONFIG, f"{field} = {compact(value)}", "does not support"))


@pytest.mark.parametrize("init", ["mica", "eva", "corda"])
def test_unsupported_initialisation_is_named(bare, folder, init):
    edit_config(folder, init_lora_weights=init)
    match = rx(
        CONFIG, f'init_lora_weights = "{init}"', "does not support", '"gaussian", "loftq", "pissa", "pissa_niter_N" and "olora"'
    )
    expect_rejected(bare, folder, match)


@pytest.mark.parametrize("peft_type", ["PREFIX_TUNING", "IA3", "lora"])
def test_other_peft_types_are_rejected(bare, folder, peft_type):
    edit_config(folder, peft_type=peft_type)
    expect_rejected(bare, folder, rx(CONFIG, f'peft_type is "{peft_type}"', '"LORA"'))


FEATURE_TENSORS = [
    (f"{PREFIX}model.embed_tokens.lora_embedding_A", [4, 64], "lora_A but no lora_B"),
    (f"{PREFIX}model.embed_tokens.lora_embedding_B", [32, 4], "lora_B but no lora_A"),
    # a state_dict name of PEFT's wrapper, which PEFT's files never hold (they name the module's own state)
    (f"{PREFIX}model.embed_tokens.modules_to_save.default.weight", [64, 32], "unexpected tensor"),
]


@pytest.mark.parametrize("name, shape, words", FEATURE_TENSORS, ids=["embedding_A", "embedding_B", "modules_to_save"])
def test_a_tensor_without_its_partner_or_of_an_unsupported_feature_is_named(bare, folder, name, shape, words):
    rewrite_tensors(folder, lambda ts: ts.__setitem__(name, torch.ones(shape)))
    expect_rejected(bare, folder, rx(WEIGHTS, words))


def test_dora_tensors_that_disagree_with_the_config_are_named(model, tmp_path):
    path = str(tmp_path / "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_adapter(path, use_dora=True)
    edit_config(path, use_dora=False)  # a magnitude vector without DoRA
    magnitude = f"{PREFIX}{Q0}.lora_magnitude_vector"
    assert magnitude in read_tensors(path)
    expect_rejected(model, path, rx(WEIGHTS, f'"{magnitude}"', "DoRA magnitude vector", "use_dora = false"))
    edit_config(path, use_dora=True)
    rewrite_tensors(path, lambda ts: ts.__setitem__(magnitude + ".weight", ts.pop(magnitude)))  # not PEFT's name
    expect_rejected(model, path, rx(WEIGHTS, "unexpected tensor", f'"{magnitude}.weight"', "lora_magnitude_vector"))


def test_a_peft_embedding_adapter_loads_beside_other_adapters(model, tmp_path):
    path = str(tmp_path / "embedding")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_adapter(path, targets=["embed_tokens", "q_proj"])
    assert f"{PREFIX}model.embed_tokens.lora_embedding_A" in read_tensors(path)
    lorafuse.load_adapter(model, path, "emb")
    layer = model.model.embed_tokens
    assert isinstance(layer, lorafuse.nn.Embedding) and list(layer.adapters) == ["emb"]
    assert torch.equal(layer.lora_embedding_A["emb"], read_tensors(path)[f"{PREFIX}model.embed_tokens.lora_embedding_A"])


# ---- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["A", "B"])
@pytest.mark.parametrize("shape", [[0], [0, 32]], ids=["flat", "rows"])
def test_zero_element_tensor_explains_partitioned_training(bare, folder, which, shape):
    if which == "B":
        shape = shape[::-1]
    set_tensor(folder, Q1, which, torch.empty(shape))
    name = tensor_name(Q1, which)
    match = rx(WEIGHTS, f'"{name}" has no elements (shape {list(shape)})', "partitioned training", "ZeRO-3")
    expect_rejected(bare, folder, match)


def test_all_zero_lora_B_loads_with_a_warning(tmp_path):
    # a lorafuse adapter saved right after inject_lora: every lora_B is still zero
    path = str(tmp_path / "untrained")
    source = tiny_llama(0)
    lorafuse.inject_lora(source, lorafuse.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorafuse.save_adapter(source, path)
    model = tiny_llama(0)
    base = logits(model)
    with pytest.warns(UserWarning, match=rx(WEIGHTS, "lora_B is all zeros in 4 of 4 modules", f'"{Q0}"')):
        lorafuse.load_adapter(model, path)
    assert default_layers(model) == QV
    assert torch.equal(logits(model), base)  # a zero B changes nothing


def test_one_all_zero_lora_B_is_named_in_the_warning(folder):
    set_tensor(folder, V1, "B", torch.zeros(16, 4))
    model = tiny_llama(0)
    with pytest.warns(UserWarning, match=rx("lora_B is all zeros in 1 of 4 modules", f'("{V1}")')) as record:
        lorafuse.load_adapter(model, folder)
    assert not any(Q0 in str(w.message) for w in record)
    assert default_layers(model) == QV


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["A", "B"])
def test_non_finite_values_are_rejected(bare, folder, which, value):
    tensor = read_tensors(folder)[tensor_name(V0, which)].clone()
    tensor[1, 2] = value
    set_tensor(folder, V0, which, tensor)
    expect_rejected(bare, folder, rx(WEIGHTS, f'"{tensor_name(V0, which)}"', "non-finite"))


def test_non_finite_values_in_float16_are_rejected(model, folder):
    tensor = read_tensors(folder)[tensor_name(Q0, "B")].half()
    tensor[0, 0] = float("inf")
    set_tensor(folder, Q0, "B", tensor)
    expect_rejected(model, folder, rx(WEIGHTS, f'"{tensor_name(Q0, "B")}"', "non-finite"))


# ---- adapter_config.json --------------------------------------------------------------------------


def write_text(folder, name, text):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())


CONFIG_FAULTS = [
    ("missing", lambda d: os.remove(os.path.join(d, CONFIG)), rx(CONFIG, "missing", WEIGHTS)),
    ("malformed", lambda d: write_text(d, CONFIG, '{"r": 4,'), rx(CONFIG, "not valid JSON")),
    ("empty", lambda d: write_text(d, CONFIG, ""), rx(CONFIG, "not valid JSON")),
    ("list", lambda d: write_text(d, CONFIG, "[1, 2]"), rx(CONFIG, "expected a JSON object", "found array")),
    (
        "string",
        lambda d: write_text(d, CONFIG, '"LORA"'),
        rx(CONFIG, "expected a JSON object", "found string"),
    ),
    ("r_string", lambda d: edit_config(d, r="8"), rx(CONFIG, 'r must be an integer, found string "8"')),
    ("r_float", lambda d: edit_config(d, r=4.5), rx(CONFIG, "r must be an integer, found number 4.5")),
    ("r_bool", lambda d: edit_config(d, r=True), rx(CONFIG, "r must be an integer, found boolean true")),
    ("r_zero", lambda d: edit_config(d, r=0), rx(CONFIG, "r: expected a rank > 0, found 0")),
    (
        "alpha_string",
        lambda d: edit_config(d, lora_alpha="8"),
        rx(CONFIG, "lora_alpha must be a number", '"8"'),
    ),
    (
        "targets_number",
        lambda d: edit_config(d, target_modules=5),
        rx(CONFIG, "target_modules must be a list of module names or a regular expression, found number 5"),
    ),
    (
        "no_peft_type",
        lambda d: edit_config(d, peft_type=DELETE),
        rx(CONFIG, "no peft_type field", '"peft_type": "LORA"'),
    ),
    (
        "use_rslora_string",
        lambda d: edit_config(d, use_rslora="yes"),
        rx(CONFIG, 'use_rslora must be true or false, found "yes"'),
    ),
]


@pytest.mark.parametrize("edit, match", [f[1:] for f in CONFIG_FAULTS], ids=[f[0] for f in CONFIG_FAULTS])
def test_bad_adapter_config(bare, folder, edit, match):
    edit(folder)
    expect_rejected(bare, folder, match)


def test_adapter_config_that_is_not_utf8(model, folder):
    text = json.dumps(read_config(folder)).replace('"v_proj"', '"v_proj\\u00e9"').encode()
    write_text(folder, CONFIG, text.replace(b"\\u00e9", b"\xe9"))
    expect_rejected(model, folder, rx(CONFIG, "not valid JSON"))


def test_unknown_config_field_loads_with_a_warning(model, folder):
    edit_config(folder, frobnicate=[1, 2])
    had = lorafuse.adapter_names(model)
    with pytest.warns(UserWarning, match=rx(CONFIG, 'unknown field "frobnicate"', "[1,2]", "ignored")):
        lorafuse.load_adapter(model, folder)
    assert lorafuse.adapter_names(model) == had + ["default"]
    assert default_layers(model) == QV


# ---- adapter_model.safetensors --------------------------------------------------------------------


class _WritesAFile:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_missing_weights_file(model, folder):
    os.remove(weights_path(folder))
    expect_rejected(model, folder, rx(WEIGHTS, "missing", CONFIG, WEIGHTS))


def test_only_a_pickle_weights_file_is_never_loaded(model, folder, tmp_path):
    marker = tmp_path / "unpickled"
    os.remove(weights_path(folder))
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        pickle.dump(_WritesAFile(str(marker)), f)
    expect_rejected(model, folder, rx(WEIGHTS, "missing", "adapter_model.bin", "pickle", "never loads"))
    assert not marker.exists()


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


CUTS = ["in_length", "at_header", "in_header", "header_end", "at_data", "in_data", "last_byte"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_weights_file(bare, folder, where):
    data = open(weights_path(folder), "rb").read()
    hl = header_length(data)
    need = len(data) - 8 - hl
    cut = dict(
        in_length=5,
        at_header=8,
        in_header=8 + hl // 2,
        header_end=8 + hl - 1,
        at_data=8 + hl,
        in_data=8 + hl + need // 3,
        last_byte=len(data) - 1,
    )[where]
    if cut < 8:
        match = rx(WEIGHTS, f"{cut} bytes, shorter than the 8-byte header length")
    elif cut < 8 + hl:
        match = rx(WEIGHTS, f"header of {hl} bytes runs past the end of the file ({cut} bytes)")
    else:
        match = rx(
            WEIGHTS, f"the tensors need {need} bytes of data but the file has {cut - 8 - hl}", "truncated"
        )
    write_text(folder, WEIGHTS, data[:cut])
    expect_rejected(bare, folder, match)


def corrupt_length(value):
    return lambda data: struct.pack("<Q", value(header_length(data))) + data[8:]


def corrupt_header(old: bytes, new: bytes):
    def edit(data):
        hl = header_length(data)
        header = data[8 : 8 + hl]
        assert old in header and len(old) == len(new)
        return data[:8] + header.replace(old, new, 1) + data[8 + hl :]

    return edit


CORRUPTIONS = [
    (
        "length_high_bit",
        corrupt_length(lambda n: n | 1 << 63),
        rx(WEIGHTS, "header length", "exceeds the limit"),
    ),
    ("length_short", corrupt_length(lambda n: n - 20), rx(WEIGHTS, "header is not valid UTF-8 JSON")),
    ("length_zero", corrupt_length(lambda n: 0), rx(WEIGHTS, "header is not valid UTF-8 JSON")),
    ("json_bracket", corrupt_header(b"{", b"["), rx(WEIGHTS, "header is not valid UTF-8 JSON")),
    ("json_quote", corrupt_header(b'"dtype"', b"'dtype'"), rx(WEIGHTS, "header is not valid UTF-8 JSON")),
    (
        "shape",
        corrupt_header(b'"shape":[4,32]', b'"shape":[4,31]'),
        rx(WEIGHTS, f'"{tensor_name(Q0, "A")}"', "[4,31]", "F32", "496", "512"),
    ),
    (
        "dtype",
        corrupt_header(b'"dtype":"F32"', b'"dtype":"I32"'),
        rx(WEIGHTS, f'"{tensor_name(Q0, "A")}"', "Int"),
    ),
    ("dtype_unknown", corrupt_header(b'"dtype":"F32"', b'"dtype":"F31"'), rx(WEIGHTS, 'unknown dtype "F31"')),
    ("offsets", corrupt_header(b"[0,512]", b"[0,511]"), rx(WEIGHTS, f'"{tensor_name(Q0, "A")}"', "511")),
]


@pytest.mark.parametrize("corrupt, match", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_weights_file(bare, folder, corrupt, match):
    path = weights_path(folder)
    data = open(path, "rb").read()
    write_text(folder, WEIGHTS, corrupt(data))
    expect_rejected(bare, folder, match)


def test_weights_header_that_is_not_utf8(model, folder):
    data = open(weights_path(folder), "rb").read()
    write_text(folder, WEIGHTS, corrupt_header(b"q_proj", b"q_pro\xff")(data))
    expect_rejected(model, folder, rx(WEIGHTS, "header is not valid UTF-8 JSON"))


def test_weights_file_without_lora_tensors(model, folder):
    write_tensors(folder, {"something.else": torch.ones(2, 2)})
    expect_rejected(
        model,
        folder,
        rx(
            WEIGHTS,
            'tensor "something.else" is not named as PEFT names',
            "base_model.model.<module>.lora_A.weight",
        ),
    )


def test_weights_file_with_no_tensors(model, folder):
    write_tensors(folder, {})
    expect_rejected(model, folder, rx(WEIGHTS, "holds no LoRA weights"))


# ---- biases (bias = "all") -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bias_dir(tmp_path_factory):
    """A lorafuse adapter of biased_llama(0) with bias = "all" (every bias saved, changed from the base);
    and the logits of the model it was saved from."""
    path = tmp_path_factory.mktemp("bias") / "adapter"
    source = biased_llama(0)
    lorafuse.inject_lora(source, lorafuse.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all"))
    randomize(source, "default", seed=7)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.5)
    lorafuse.save_adapter(source, str(path))
    return str(path), logits(source)


@pytest.fixture(params=["bare", "with_adapter"])
def biased_model(request):
    m = biased_llama(0)
    if request.param == "with_adapter":
        lorafuse.inject_lora(m, lorafuse.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]), "first")
        randomize(m, "first", seed=5)
    return m


K0_BIAS = "model.layers.0.self_attn.k_proj.bias"


def test_bias_adapter_round_trips(bias_dir):
    path, expected = bias_dir
    model = biased_llama(0)
    assert not torch.equal(logits(model), expected)
    lorafuse.load_adapter(model, path)
    assert torch.equal(logits(model), expected)
    assert not [n for n, p in model.named_parameters() if p.requires_grad]  # PEFT's default: inference
    model = biased_llama(0)
    lorafuse.load_adapter(model, path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith(".bias")} == {
        n for n, _ in model.named_parameters() if n.endswith(".bias")
    }


def test_bias_of_another_shape(biased_model, bias_dir, tmp_path):
    folder = copy_folder(bias_dir[0], tmp_path / "adapter")
    rewrite_tensors(folder, lambda ts: ts.__setitem__(PREFIX + K0_BIAS, torch.ones(5)))
    match = rx(f'bias "{K0_BIAS}" is [5] in the file but [16] in the model')
    expect_rejected(biased_model, folder, match, in_file=False)


def test_bias_the_model_lacks(biased_model, bias_dir, tmp_path):
    folder = copy_folder(bias_dir[0], tmp_path / "adapter")
    absent = "model.layers.9.self_attn.k_proj.bias"
    rewrite_tensors(folder, lambda ts: ts.__setitem__(PREFIX + absent, ts.pop(PREFIX + K0_BIAS)))
    expect_rejected(
        biased_model, folder, rx(f'the file has bias "{absent}", which the model lacks'), in_file=False
    )


def test_biases_for_a_model_without_biases(model, bias_dir):
    expect_rejected(
        model, bias_dir[0], rx("the file has bias", "base_layer.bias", "which the model lacks"), in_file=False
    )


def test_bias_in_a_file_whose_config_says_none(biased_model, bias_dir, tmp_path):
    folder = copy_folder(bias_dir[0], tmp_path / "adapter")
    edit_config(folder, bias="none")
    expect_rejected(
        biased_model, folder, rx(WEIGHTS, ".bias", "is a bias", 'adapter_config.json says bias = "none"')
    )


def test_bias_of_a_non_float_dtype(biased_model, bias_dir, tmp_path):
    folder = copy_folder(bias_dir[0], tmp_path / "adapter")
    rewrite_tensors(folder, lambda ts: ts.__setitem__(PREFIX + K0_BIAS, ts[PREFIX + K0_BIAS].to(torch.int32)))
    expect_rejected(
        biased_model, folder, rx(WEIGHTS, f'bias "{PREFIX + K0_BIAS}"', "not floating point", "Int")
    )


def test_non_finite_bias_is_rejected(biased_model, bias_dir, tmp_path):
    folder = copy_folder(bias_dir[0], tmp_path / "adapter")

    def poison(ts):
        ts[PREFIX + K0_BIAS] = ts[PREFIX + K0_BIAS].clone()
        ts[PREFIX + K0_BIAS][3] = float("nan")

    rewrite_tensors(folder, poison)
    expect_rejected(biased_model, folder, rx(WEIGHTS, f'"{PREFIX + K0_BIAS}"', "non-finite"))


# ---- after a failed load ---------------------------------------------------------------------------


def test_a_failed_load_leaves_nothing_behind_for_the_next(model, folder, good_dir):
    set_tensor(folder, V1, "B", torch.randn(40, 4))  # the last layer of the file is wrong
    with pytest.raises(ValueError, match=rx(f'"{V1}"', "lora_B is [40, 4]")):
        lorafuse.load_adapter(model, folder)
    lorafuse.load_adapter(model, good_dir)  # the same name, now from a good folder
    assert default_layers(model) == QV
    expected = tiny_llama(0)
    lorafuse.load_adapter(expected, good_dir)
    lorafuse.set_adapter(model, "default")
    assert torch.equal(logits(model), logits(expected))


# ---- the folder and the name ----------------------------------------------------------------------


def test_dir_that_is_a_file(model, folder):
    path = weights_path(folder)
    expect_rejected(model, path, rx(f'"{path}" is not a folder', CONFIG, WEIGHTS))


def test_dir_that_does_not_exist(model, tmp_path):
    path = str(tmp_path / "no" / "such" / "adapter")
    expect_rejected(model, path, rx(f'"{path}" does not exist'))


def test_adapter_name_already_used(folder):
    model = tiny_llama(0)
    lorafuse.load_adapter(model, folder, "mine")
    expect_rejected(
        model,
        folder,
        rx('already has an adapter named "mine"', "[mine]"),
        in_file=False,
        adapter_name="mine",
    )


KINDS = ["bare", "with_adapter"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["a.b", "with space", "tab\tname"], ids=["dot", "space", "tab"])
def test_adapter_name_that_cannot_be_a_module_name(folder, kind, name):
    match = rx(f"adapter_name: \"{name}\" may not contain '.', whitespace or control characters")
    expect_rejected(make_model(kind), folder, match, in_file=False, adapter_name=name)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_adapter_name(folder, kind):
    expect_rejected(make_model(kind), folder, rx("adapter_name", "non-empty"), in_file=False, adapter_name="")


def test_adapter_name_that_is_not_a_string(model, folder):
    before = snapshot(model)
    with pytest.raises(TypeError, match=rx("adapter_name must be a str, found int")):
        lorafuse.load_adapter(model, folder, 3)
    assert_unchanged(model, before)


# ---- folders that load ----------------------------------------------------------------------------


def test_lorafuse_adapter_round_trips(tmp_path):
    source = lorafuse_adapter(tmp_path / "saved", seed=11)
    expected = logits(source)
    source_layers = dict(lorafuse.lora_layers(source))
    model = tiny_llama(0)
    assert not torch.equal(logits(model), expected)  # the adapter does change the outputs
    lorafuse.load_adapter(model, str(tmp_path / "saved"), is_trainable=True)
    assert torch.equal(logits(model), expected)
    file = read_tensors(tmp_path / "saved")
    layers = dict(lorafuse.lora_layers(model))
    assert list(layers) == QV
    for m in QV:
        for which in "AB":
            mine = getattr(source_layers[m], f"lora_{which}")["default"].weight
            loaded = getattr(layers[m], f"lora_{which}")["default"].weight
            assert torch.equal(file[tensor_name(m, which)], mine), (m, which)
            assert torch.equal(loaded, mine), (m, which)
            assert loaded.requires_grad  # the only adapter: active and trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # saved again from the loaded model: the same config and bit-identical tensors
    lorafuse.save_adapter(model, str(tmp_path / "again"))
    assert read_config(tmp_path / "again") == read_config(tmp_path / "saved")
    again = read_tensors(tmp_path / "again")
    assert again.keys() == file.keys()
    assert all(torch.equal(again[k], file[k]) for k in file)


def test_peft_saved_adapter_loads_with_peft_outputs(tmp_path):
    path = str(tmp_path / "peft")
    pm = peft_adapter(path, r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})
    expected = logits(pm)
    model = tiny_llama(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in a PEFT file is unknown
        lorafuse.load_adapter(model, path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    layers = dict(lorafuse.lora_layers(model))
    assert [layers[m].adapters["default"].r for m in QV] == [4, 2, 4, 2]
    assert [layers[m].adapters["default"].lora_alpha for m in QV] == [16, 8, 16, 8]


def test_lorafuse_saved_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    source = lorafuse_adapter(tmp_path / "saved", seed=12)
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "saved")).eval()
    torch.testing.assert_close(logits(pm), logits(source), rtol=1e-5, atol=1e-5)


def test_second_adapter_loads_inactive_and_frozen(tmp_path):
    lorafuse_adapter(tmp_path / "one", seed=21)
    lorafuse_adapter(tmp_path / "two", r=8, targets=("q_proj", "o_proj"), seed=22)
    only_two = tiny_llama(0)
    lorafuse.load_adapter(only_two, str(tmp_path / "two"))
    expected_two = logits(only_two)

    model = tiny_llama(0)
    lorafuse.load_adapter(model, str(tmp_path / "one"), "one", is_trainable=True)
    expected_one = logits(model)
    assert not torch.equal(expected_one, expected_two)
    lorafuse.load_adapter(model, str(tmp_path / "two"), "two")
    assert lorafuse.adapter_names(model) == ["one", "two"]
    assert lorafuse.active_adapter(model) == "one"
    assert torch.equal(logits(model), expected_one)  # the new adapter waits
    layers = lorafuse.lora_layers(model)
    # o_proj was a plain Linear: it is wrapped now, with only "two", and runs as its base
    assert [p for p, layer in layers if "two" in layer.adapters] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    for _, layer in layers:
        if "two" in layer.adapters:
            assert (
                not layer.lora_A["two"].weight.requires_grad and not layer.lora_B["two"].weight.requires_grad
            )
        if "one" in layer.adapters:
            assert layer.lora_A["one"].weight.requires_grad and layer.lora_B["one"].weight.requires_grad
    lorafuse.set_adapter(model, "two")
    assert lorafuse.active_adapter(model) == "two"
    assert torch.equal(logits(model), expected_two)
    lorafuse.set_adapter(model, "one")
    assert torch.equal(logits(model), expected_one)


# ---- a save killed at random moments --------------------------------------------------------------

# Run in this process and in the child, so that both build the same two adapters.
TWO_ADAPTERS = '''
import torch, lorafuse

def two_adapters():
    """A model with adapter "A" (rank 4) and adapter "B" (rank 8), random weights from fixed seeds."""
    torch.manual_seed(0)
    blocks = {}
    for i in range(4):
        blocks[f"block{i}"] = torch.nn.ModuleDict(
            {"q_proj": torch.nn.Linear(64, 64), "v_proj": torch.nn.Linear(64, 32)}
        )
    model = torch.nn.ModuleDict(blocks)
    for name, r in (("A", 4), ("B", 8)):
        config = lorafuse.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)
        lorafuse.inject_lora(model, config, name)
    return model
'''

# The child imports torch once, then for each line on stdin forks a saver that prints "ready <pid>" and
# saves A, B, A, B, ... over the folder until the parent kills it; the child reaps it and says "reaped".
SAVER = (
    TWO_ADAPTERS
    + """
import os, sys
torch.set_num_threads(1)
model, folder = two_adapters(), sys.argv[1]
print("up", flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        print("ready", os.getpid(), flush=True)
        while True:
            for name in ("A", "B"):
                lorafuse.save_adapter(model, folder, name)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
)


def test_a_save_killed_at_random_moments_leaves_one_whole_adapter(tmp_path):
    namespace = {}
    exec(TWO_ADAPTERS, namespace)
    source = namespace["two_adapters"]()
    refs = {}
    for name, r in (("A", 4), ("B", 8)):
        ref = str(tmp_path / f"ref_{name}")
        lorafuse.save_adapter(source, ref, name)
        adapter = lorafuse.read_adapter(ref)
        assert adapter["config"]["r"] == r and all(a.shape[0] == r for _, a, _ in adapter["layers"])
        files = tuple(open(os.path.join(ref, f), "rb").read() for f in (CONFIG, WEIGHTS))
        refs[name] = (files, adapter)
    assert refs["A"][0] != refs["B"][0]

    folder = str(tmp_path / "adapter")
    lorafuse.save_adapter(source, folder, "A")
    notes = b"the user's own notes, kept across saves\n"
    with open(os.path.join(folder, "notes.txt"), "wb") as f:
        f.write(notes)

    def which_adapter() -> str:
        assert sorted(os.listdir(folder)) == sorted([CONFIG, WEIGHTS, "notes.txt"])
        with open(os.path.join(folder, "notes.txt"), "rb") as f:
            assert f.read() == notes
        files = tuple(open(os.path.join(folder, f), "rb").read() for f in (CONFIG, WEIGHTS))
        got = lorafuse.read_adapter(folder)
        for name, (ref_files, ref) in refs.items():
            if got["config_json"] == ref["config_json"]:
                # both files from the same save: the weights are that adapter's, bit for bit
                assert files == ref_files, f"config of {name} with other weights"
                assert [p for p, _, _ in got["layers"]] == [p for p, _, _ in ref["layers"]]
                for (_, a, b), (_, ra, rb) in zip(got["layers"], ref["layers"]):
                    assert torch.equal(a, ra) and torch.equal(b, rb)
                return name
        raise AssertionError(f"the folder holds neither adapter: {got['config_json']}")

    assert which_adapter() == "A"
    package_root = os.path.dirname(os.path.dirname(lorafuse.__file__))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", SAVER, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    watchdog = threading.Timer(120, child.kill)  # a hung child ends the test instead of hanging it
    watchdog.start()
    rng = random.Random(20240611)
    seen, saver = [], None
    try:
        assert child.stdout.readline().strip() == b"up"
        for _ in range(20):
            child.stdin.write(b"go\n")
            child.stdin.flush()
            line = child.stdout.readline().split()
            assert len(line) == 2 and line[0] == b"ready", line
            saver = int(line[1])
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(saver, signal.SIGKILL)
            assert child.stdout.readline().strip() == b"reaped"
            saver = None
            seen.append(which_adapter())
            # what a kill leaves behind is a staging folder beside it, never a torn folder
            leftovers = set(os.listdir(tmp_path)) - {"adapter", "ref_A", "ref_B"}
            assert all(re.fullmatch(r"adapter\.saving-\w{6}", n) for n in leftovers), leftovers
    finally:
        watchdog.cancel()
        if saver is not None:  # a failure between fork and kill: the saver must not outlive the test
            try:
                os.kill(saver, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.stdin.close()
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
    # the saver got through many saves: both adapters were the last whole one at some kill
    assert set(seen) == {"A", "B"}, seen
    # the folder is still a good target: a save over it (with the leftovers beside it) works
    lorafuse.save_adapter(source, folder, "B")
    assert which_adapter() == "B"
