"""The adapter scenario table (tests/scenarios/adapters.json), run by the Python layer.

The same table runs in C++ (tests/cpp/peft/test_scenarios.cpp). Here every scenario runs on two models built
from the table's shape: a transformers LlamaForCausalLM (Python lorafuse.nn.Linear layers) and the bound C++
lorafuse.models.Llama (the model-wide functions run their C++ implementation on it).
"""

import json
import os

import lorafuse
import pytest
import torch

TABLE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scenarios", "adapters.json")
with open(TABLE_PATH) as f:
    TABLE = json.load(f)

SCENARIOS = {s["name"]: s for s in TABLE["scenarios"]}
MODEL_KINDS = ["transformers", "cpp"]


def _model_shape():
    return {k: v for k, v in TABLE["model"].items() if k != "seed"}


def build_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(TABLE["model"]["seed"])
    if kind == "transformers":
        transformers = pytest.importorskip("transformers")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_model_shape()))
    else:
        model = lorafuse.models.Llama(lorafuse.models.LlamaConfig(**_model_shape()))
    model.eval()
    return model


def lora_config(name: str) -> lorafuse.LoraConfig:
    c = TABLE["configs"][name]
    init = {"random": False, "default": True, "gaussian": "gaussian"}[c["init"]]
    return lorafuse.LoraConfig(
        r=c["r"], lora_alpha=c["lora_alpha"], target_modules=c["targets"], init_lora_weights=init,
        modules_to_save=c.get("modules_to_save"),
    )


def base_weights(model: torch.nn.Module) -> dict:
    """Every parameter but the adapters', named as in the model without LoRA layers."""
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            continue
        out[".".join(x for x in parts if x != "base_layer")] = p.detach().clone()
    return out


class Runner:
    def __init__(self, kind: str, folder: str) -> None:
        self.kind = kind
        self.folder = folder
        self.model = build_model(kind)
        self.ids = torch.tensor(TABLE["input_ids"], dtype=torch.long)
        self.outputs = {}
        self.weights = {}
        self.tol = TABLE["tolerance"]

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=self.ids) if self.kind == "transformers" else self.model(self.ids)
        return (out.logits if hasattr(out, "logits") else out).detach().clone()

    def run(self, steps, where: str) -> None:
        for i, step in enumerate(steps):
            self.step(step, f"{where}[{i}] {json.dumps(step)}")

    def step(self, s: dict, where: str) -> None:
        do, m = s["do"], self.model
        if do in ("inject", "add"):
            torch.manual_seed(s["seed"])
            if do == "inject":
                lorafuse.inject_lora(m, lora_config(s["config"]), s["name"])
            else:
                lorafuse.add_adapter(m, s["name"], lora_config(s["config"]))
        elif do == "set":
            lorafuse.set_adapter(m, s["name"])
        elif do == "disable":
            lorafuse.disable_adapters(m)
        elif do == "enable":
            lorafuse.enable_adapters(m)
        elif do == "delete":
            lorafuse.delete_adapter(m, s["name"])
        elif do == "merge":
            lorafuse.merge(m, s.get("names"))
        elif do == "unmerge":
            lorafuse.unmerge(m)
        elif do == "merge_and_unload":
            lorafuse.merge_and_unload(m)
        elif do == "save":
            lorafuse.save_adapter(m, os.path.join(self.folder, s["slot"]), s["name"])
        elif do == "load":
            lorafuse.load_adapter(
                m, os.path.join(self.folder, s["slot"]), s["name"], is_trainable=s.get("is_trainable", False)
            )
        elif do == "fresh_model":
            self.model = build_model(self.kind)
        elif do == "scope":
            with lorafuse.use_adapter(s["name"]):
                self.run(s["steps"], f"{where} > scope")
        elif do == "forward":
            self.logits()
        elif do == "record":
            self.outputs[s["label"]] = self.logits()
        elif do == "record_weights":
            self.weights[s["label"]] = base_weights(m)
        elif do == "expect_output":
            self.expect_output(s, where)
        elif do in ("expect_weights_equal", "expect_weights_differ"):
            now, then = base_weights(m), self.weights[s["label"]]
            assert sorted(now) == sorted(then), f"{where}: parameter names differ"
            same = all(torch.equal(now[k], then[k]) for k in now)
            assert same == (do == "expect_weights_equal"), (
                f"{where}: weights {'differ' if not same else 'equal'}"
            )
        elif do == "expect_adapters":
            assert lorafuse.adapter_names(m) == s["names"], where
        elif do == "expect_active":
            assert (lorafuse.active_adapter(m) or "") == s["name"], where
        elif do == "expect_lora_layers":
            assert len(lorafuse.lora_layers(m)) == s["count"], where
        elif do == "expect_saved_modules":
            assert [path for path, _ in lorafuse.saved_modules(m)] == s["paths"], where
        elif do == "expect_trainable":
            assert lorafuse.trainable_parameters(m)[0] == s["count"], where
        elif do == "expect_error":
            self.expect_error(s, where)
        elif do == "expect_warning":
            with pytest.warns(UserWarning) as caught:
                self.step(s["step"], f"{where} > step")
            messages = [str(w.message) for w in caught]
            assert any(all(part in m for part in s["message_contains"]) for m in messages), f"{where}: {messages}"
        else:
            raise AssertionError(f"{where}: unknown step kind {do!r}")

    def expect_output(self, s: dict, where: str) -> None:
        now = self.logits()
        if "same_as" in s:
            ref = self.outputs[s["same_as"]]
            if s.get("exact", False):
                assert torch.equal(now, ref), f"{where}: max |diff| {(now - ref).abs().max().item():.3g}"
            else:
                torch.testing.assert_close(now, ref, rtol=self.tol["rtol"], atol=self.tol["atol"], msg=where)
        else:
            ref = self.outputs[s["differs_from"]]
            diff = (now - ref).abs().max().item()
            assert diff > TABLE["min_difference"], f"{where}: max |diff| {diff:.3g} only"

    def expect_error(self, s: dict, where: str) -> None:
        kind = {"ValueError": ValueError, "TypeError": TypeError}[s["type"]]
        with pytest.raises(kind) as info:
            self.step(s["step"], f"{where} > step")
        message = str(info.value)
        for part in s["message_contains"]:
            assert part in message, f"{where}: {part!r} not in {message!r}"


def test_the_table_is_well_formed():
    kinds = set(TABLE["step_kinds"])
    names = [s["name"] for s in TABLE["scenarios"]]
    assert len(names) == len(set(names))

    def walk(steps):
        for s in steps:
            assert s["do"] in kinds, s
            if s["do"] == "scope":
                walk(s["steps"])
            if s["do"] in ("expect_error", "expect_warning"):
                assert s["message_contains"], s
                walk([s["step"]])

    for scenario in TABLE["scenarios"]:
        walk(scenario["steps"])


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(scenario, kind, tmp_path):
    Runner(kind, str(tmp_path)).run(SCENARIOS[scenario]["steps"], scenario)
