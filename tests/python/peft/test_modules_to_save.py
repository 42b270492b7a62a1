"""modules_to_save and PEFT's task types SEQ_CLS / TOKEN_CLS / QUESTION_ANS beside the real peft: the task head trains
whole with the adapter (lorafuse.nn.ModulesToSave, PEFT's ModulesToSaveWrapper), is saved with it in PEFT's format,
switches with the adapter, and replaces the module on merge_and_unload; refusals named."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorafuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_zoo  # noqa: E402

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # training steps compare without dropout

# (name, task type, builder, targets, the head PEFT keeps whole, output field)
CASES = {
    "bert-seq_cls": ("SEQ_CLS", lambda: T.BertForSequenceClassification(T.BertConfig(**_SMALL, num_labels=3)),
                     ["query", "value"], "classifier", "logits"),
    "roberta-seq_cls": ("SEQ_CLS", lambda: T.RobertaForSequenceClassification(
        T.RobertaConfig(**_SMALL, num_labels=3, max_position_embeddings=40)), "all-linear", "classifier", "logits"),
    "llama-seq_cls": ("SEQ_CLS", lambda: T.LlamaForSequenceClassification(
        T.LlamaConfig(**_SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0)), None, "score", "logits"),
    "gpt2-seq_cls": ("SEQ_CLS", lambda: T.GPT2ForSequenceClassification(
        T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, num_labels=2, pad_token_id=0)),
        None, "score", "logits"),
    "bert-token_cls": ("TOKEN_CLS", lambda: T.BertForTokenClassification(T.BertConfig(**_SMALL, num_labels=5)),
                       ["query", "value"], "classifier", "logits"),
    "bert-question_ans": ("QUESTION_ANS", lambda: T.BertForQuestionAnswering(T.BertConfig(**_SMALL)),
                          ["query", "value"], "qa_outputs", "start_logits"),
}

IDS = torch.arange(12).remainder(60).reshape(2, 6) + 2


def _build(case, seed=0):
    torch.manual_seed(seed)
    return CASES[case][1]().eval()


def _out(model, case, ids=IDS):
    return getattr(model(input_ids=ids), CASES[case][4])


def _pair(case, **extra):
    """A tiny model of `case`, PEFT's model and lorafuse's of it with the same config, and the same non-zero trainable
    values in both (PEFT's copied into lorafuse's, the head's copy changed too)."""
    task, _, targets, head, _ = CASES[case]
    base = _build(case)
    config = dict(r=4, lora_alpha=8, task_type=task, target_modules=targets, init_lora_weights=False, **extra)
    theirs = hf_zoo.peft_model(copy.deepcopy(base), **config).eval()
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config)).eval()
    theirs_params = {n[len(hf_zoo.PEFT_PREFIX):]: p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(theirs_params) == sorted(ours_params)
    with torch.no_grad():
        for name, p in theirs_params.items():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.5)  # a trained head: differs from the original
            ours_params[name].copy_(p)
    return base, theirs, ours, head


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_heads_train_whole_as_in_peft(case, tmp_path):
    base, theirs, ours, head = _pair(case)
    wrapped = [p for p, _ in lorafuse.peft.saved_modules(ours)]
    peft_wrapped = [p for p, m in theirs.base_model.model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert wrapped == peft_wrapped and wrapped and all(p.endswith(head) for p in wrapped)
    peft_lora = sorted(p for p, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(p for p, _ in lorafuse.lora_layers(ours)) == peft_lora  # LoRA leaves the head's layers alone
    assert lorafuse.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    with torch.no_grad():
        expected = _out(theirs, case)
        assert (expected - _out(base, case)).abs().max() > 1e-2
        hf_zoo.assert_close(_out(ours, case), expected)

    # files both ways: PEFT's names (base_model.model.<head>.weight), the config's modules_to_save and task type
    lorafuse.save_adapter(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key in [k for k in tensors if "lora_" not in k]:
        assert key.startswith(f"{hf_zoo.PEFT_PREFIX}{wrapped[0]}.") and "modules_to_save" not in key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(_build(case), tmp_path / "ours").eval()
    with torch.no_grad():
        hf_zoo.assert_close(_out(again, case), expected)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorafuse.load_adapter(_build(case), tmp_path / "peft").eval()
    assert [p for p, _ in lorafuse.peft.saved_modules(loaded)] == wrapped
    assert lorafuse.trainable_parameters(loaded)[0] == 0  # is_trainable=False: frozen, as PEFT
    with torch.no_grad():
        hf_zoo.assert_close(_out(loaded, case), expected)
    read = lorafuse.read_adapter(tmp_path / "peft")
    assert [p for p, _ in read["saved_modules"]] == wrapped
    assert CASES[case][0] == read["config"]["task_type"]

    # merge_and_unload (and unload): the trained copy takes the head's place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_theirs = theirs.merge_and_unload()
    merged = lorafuse.merge_and_unload(ours)
    head_module = merged.get_submodule(wrapped[0])
    assert type(head_module) is type(merged_theirs.get_submodule(wrapped[0]))
    with torch.no_grad():
        hf_zoo.assert_close(_out(merged, case), expected)
    unloaded = lorafuse.unload(loaded)
    assert type(unloaded.get_submodule(wrapped[0])) is type(head_module)


@pytest.mark.parametrize("case", ["bert-seq_cls", "llama-seq_cls", "bert-question_ans"])
def test_a_training_step_equals_peft(case):
    _, theirs, ours, _ = _pair(case)
    theirs.train()
    ours.train()
    (g_theirs, g_ours), (after_theirs, after_ours) = hf_zoo.sgd_step_side_by_side(
        theirs, ours, lambda m: _out(m, case)
    )
    hf_zoo.assert_same_grads(g_theirs, g_ours)
    assert any(".modules_to_save." in n and g is not None for n, g in g_ours.items())
    hf_zoo.assert_close(after_ours, after_theirs, rtol=1e-4, atol=1e-5)
    head = lorafuse.peft.saved_modules(ours)[0][1]
    assert all(not p.requires_grad and p.grad is None for p in head.original_module.parameters())


def test_adapters_switch_their_heads_in_scopes_and_mixed_batches_and_disable():
    case = "bert-seq_cls"
    base = _build(case)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, task_type="SEQ_CLS",
                                                                          target_modules=["query"]))
    lorafuse.add_adapter(ours, "other", lorafuse.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["value"]))
    ours.eval()
    head = ours.classifier
    assert isinstance(head, lorafuse.nn.ModulesToSave) and list(head.adapters) == ["default", "other"]
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
        head.modules_to_save["other"].weight.sub_(1.0)
        first = _out(ours, case)
        lorafuse.set_adapter(ours, "other")
        second = _out(ours, case)
        assert head.modules_to_save["other"].weight.requires_grad
        assert not head.modules_to_save["default"].weight.requires_grad
        assert (first - second).abs().max() > 1e-2
        with lorafuse.use_adapter("default"):
            hf_zoo.assert_close(_out(ours, case), first)
        with lorafuse.use_adapter(""):
            hf_zoo.assert_close(_out(ours, case), _out(base, case))
        # one adapter per row: each row's head
        with lorafuse.use_adapter(["default", "other"]):
            mixed = _out(ours, case)
        hf_zoo.assert_close(mixed[0], first[0])
        hf_zoo.assert_close(mixed[1], second[1])
        with lorafuse.use_adapter(["__base__", "default"]):
            mixed = _out(ours, case)
        hf_zoo.assert_close(mixed[0], _out(base, case)[0])
        # attributes are the running module's, as PEFT's wrapper gives them
        assert head.out_features == 3 and torch.equal(head.weight, head.modules_to_save["other"].weight)
        lorafuse.disable_adapters(ours)
        hf_zoo.assert_close(_out(ours, case), _out(base, case))
        assert not any(p.requires_grad for p in head.parameters())
        lorafuse.enable_adapters(ours)
        hf_zoo.assert_close(_out(ours, case), second)
    lorafuse.delete_adapter(ours, "other")
    assert list(head.adapters) == ["default"] and head.active_adapter == "default"
    with torch.no_grad():
        hf_zoo.assert_close(_out(ours, case), first)


def test_peft_switches_heads_the_same_way(tmp_path):
    """Two adapters with their own heads, saved by lorafuse and loaded by PEFT (and back): set_adapter gives the same
    outputs in both."""
    case = "bert-seq_cls"
    base = _build(case)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(r=4, task_type="SEQ_CLS",
                                                                          target_modules=["query"],
                                                                          init_lora_weights=False))
    lorafuse.add_adapter(ours, "other", lorafuse.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["value"],
                                                            init_lora_weights=False))
    with torch.no_grad():
        ours.classifier.modules_to_save["other"].bias.add_(2.0)
    for name in ("default", "other"):
        lorafuse.save_adapter(ours, tmp_path / name, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "default").eval()
        theirs.load_adapter(tmp_path / "other", adapter_name="other")
    ours.eval()
    for name in ("default", "other"):
        lorafuse.set_adapter(ours, name)
        theirs.set_adapter(name)
        with torch.no_grad():
            hf_zoo.assert_close(_out(ours, case), _out(theirs, case))
    converted = lorafuse.from_peft(theirs)
    assert isinstance(converted.classifier, lorafuse.nn.ModulesToSave)
    assert list(converted.classifier.adapters) == ["default", "other"]
    assert converted.classifier.active_adapter == "other"
    with torch.no_grad():
        hf_zoo.assert_close(_out(converted, case), _out(ours, case))
        lorafuse.set_adapter(converted, "default")
        lorafuse.set_adapter(ours, "default")
        hf_zoo.assert_close(_out(converted, case), _out(ours, case))


def test_explicit_modules_to_save_and_lora_left_out_inside_them():
    base = _build("bert-seq_cls")
    config = dict(r=4, target_modules="all-linear", modules_to_save=["pooler", "classifier"])
    theirs = hf_zoo.peft_model(copy.deepcopy(base), **config)
    ours = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(**config))
    peft_wrapped = [p for p, m in theirs.base_model.model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert [p for p, _ in lorafuse.peft.saved_modules(ours)] == peft_wrapped
    peft_lora = sorted(p for p, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(p for p, _ in lorafuse.lora_layers(ours)) == peft_lora
    assert peft_wrapped == ["bert.pooler", "classifier"]
    assert not any(p.startswith(("classifier", "bert.pooler")) for p in peft_lora)
    assert lorafuse.trainable_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())


def test_bias_all_trains_and_saves_as_peft(tmp_path):
    """bias="all" with a task head: the same trainable parameters as PEFT (the original's bias stays frozen), and PEFT's
    file (which also names the wrapper's biases) loads with the same outputs."""
    base, theirs, ours, _ = _pair("bert-seq_cls", bias="all")
    t = sorted(n[len(hf_zoo.PEFT_PREFIX):] for n, p in theirs.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == t
    assert not ours.classifier.original_module.bias.requires_grad
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.1)
        expected = _out(theirs, "bert-seq_cls")
    theirs.save_pretrained(tmp_path / "peft")
    loaded = lorafuse.load_adapter(_build("bert-seq_cls"), tmp_path / "peft").eval()
    with torch.no_grad():
        hf_zoo.assert_close(_out(loaded, "bert-seq_cls"), expected)


def test_tied_weights_are_refused():
    torch.manual_seed(0)
    tied = T.LlamaForCausalLM(T.LlamaConfig(**_SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"modules_to_save: .* \(tied weights\): a copy of it per adapter would untie"):
        lorafuse.inject_lora(tied, lorafuse.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert not lorafuse.lora_layers(tied)


def test_a_replaced_copy_is_the_one_that_runs():
    """FSDP's auto-wrap or a user may put another module in modules_to_save[name]: forward and attributes use it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("head", torch.nn.Linear(8, 4))
    model.add_module("classifier", torch.nn.Linear(4, 3))
    lorafuse.inject_lora(model, lorafuse.LoraConfig(r=2, target_modules=["head"], modules_to_save=["classifier"]))
    new = torch.nn.Linear(4, 3)
    model.classifier.modules_to_save["default"] = new
    x = torch.randn(2, 8)
    with torch.no_grad():
        hf_zoo.assert_close(model(x), new(model.head(x)))
    assert model.classifier.weight is new.weight


def test_refusals_name_the_option(tmp_path):
    base = _build("roberta-seq_cls")
    with pytest.raises(ValueError, match=r'modules_to_save: \["head"\] names no module'):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["query"],
                                                                       modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r'names both "classifier" and "classifier.out_proj"'):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["query"],
                                                                       modules_to_save=["classifier", "out_proj"]))
    with pytest.raises(TypeError, match="modules_to_save: expected a list of module names"):
        lorafuse.LoraConfig(modules_to_save="classifier")
    with pytest.raises(ValueError, match="modules_to_save: an empty module name"):
        lorafuse.LoraConfig(modules_to_save=[""])
    with pytest.raises(ValueError, match="task_type: expected one of PEFT's task types"):
        lorafuse.LoraConfig(task_type="SEQ_CLASSIFICATION")
    model = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r'names "roberta.encoder.layer.0.attention.self.query", a LoRA layer'):
        lorafuse.add_adapter(model, "b", lorafuse.LoraConfig(target_modules=["value"], modules_to_save=["query"]))
    assert lorafuse.adapter_names(model) == ["default"]  # nothing changed
    # a module that LoRA targets and modules_to_save names (PEFT's plain suffix rule: "pre_classifier" ends with
    # "classifier"): refused before anything changes, as PEFT refuses it
    heads = torch.nn.Sequential()
    heads.add_module("pre_classifier", torch.nn.Linear(8, 8))
    heads.add_module("classifier", torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r'names "pre_classifier" .* target_modules selects "pre_classifier" for LoRA'):
        lorafuse.inject_lora(heads, lorafuse.LoraConfig(target_modules=["pre_classifier"], modules_to_save=["classifier"]))
    assert not lorafuse.lora_layers(heads)
    with pytest.raises(ValueError, match="selects only .* inside modules that modules_to_save"):
        lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(target_modules=["out_proj"],
                                                                       modules_to_save=["classifier"]))
    # the out_proj of an nn.MultiheadAttention: the attention reads its weight and never calls a copy
    attention = torch.nn.Module()
    attention.attn = torch.nn.MultiheadAttention(8, 2)
    attention.head = torch.nn.Linear(8, 2)
    with pytest.raises(ValueError, match='"attn.out_proj" is a NonDynamicallyQuantizableLinear .* never calls'):
        lorafuse.inject_lora(attention, lorafuse.LoraConfig(target_modules=["head"], modules_to_save=["out_proj"]))
    # a head of another shape in the file: named, before anything changes
    seq = lorafuse.inject_lora(copy.deepcopy(base), lorafuse.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    lorafuse.save_adapter(seq, tmp_path / "a")
    torch.manual_seed(0)
    other = T.RobertaForSequenceClassification(T.RobertaConfig(**_SMALL, num_labels=5, max_position_embeddings=40))
    with pytest.raises(ValueError, match=r'"classifier" \(modules_to_save\): the file\'s "out_proj.weight" is'):
        lorafuse.load_adapter(other, tmp_path / "a")
    assert not lorafuse.lora_layers(other)
    # a model whose head the task type does not name: a warning, the LoRA layers alone train (PEFT says nothing)
    t5 = T.T5ForSequenceClassification(T.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                   vocab_size=64, decoder_start_token_id=0))
    with pytest.warns(UserWarning, match=r'modules_to_save: \["classifier", "score"\] names no module'):
        lorafuse.inject_lora(t5, lorafuse.LoraConfig(task_type="SEQ_CLS", target_modules=["q", "v"]))
    assert not lorafuse.peft.saved_modules(t5)
