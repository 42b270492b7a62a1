"""One rank of a multi-process LoRA fine-tune of a tiny Hugging Face Llama; launched by test_distributed.py.

    torchrun --standalone --nproc_per_node=2 distributed_worker.py --mode ddp --out result.pt

Every rank builds the same model (same seed), injects lorafuse LoRA adapters, wraps the model
(DistributedDataParallel or FSDP2 ``fully_shard``), and trains ``STEPS`` AdamW steps on its shard of a fixed
global batch. Rank 0 saves the final adapter weights and what the wrapper synchronised to ``--out``.

The test imports this file too (``build_model``, ``global_batches``, ``train_single_process``) so that the
single-process reference trains exactly the same model on exactly the same data.
"""

import argparse
import gc
import os
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import lorafuse
from hf_models import tiny_llama_config  # beside this file: on sys.path for torchrun and for pytest

STEPS = 3
GLOBAL_BATCH = 4  # sequences per step over all ranks
SEQ_LEN = 8
VOCAB = 64
LR = 1e-2


def build_model(seed: int = 0) -> torch.nn.Module:
    """The tests' tiny Llama (hf_models.py) with q_proj/v_proj adapters; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    # init_lora_weights=False: B is random too, so A gets a non-zero gradient from the first step.
    # lora_dropout=0: no random masks, so every run of the same data is deterministic.
    lorafuse.inject_lora(
        model, lorafuse.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    )
    return model.train()


def global_batches() -> torch.Tensor:
    """[STEPS, GLOBAL_BATCH, SEQ_LEN] token ids, the same on every rank (own generator, not the global
    seed)."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ_LEN), generator=gen)


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s shard of one global batch: rows rank, rank + world, ..."""
    return batch[rank::world]


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token, averaged over the (local) batch: every shard has the same number of
    tokens, so the mean of the ranks' means (what DDP's gradient averaging computes) is the global mean."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA entries of a state_dict (FSDP2's sharded DTensors gathered into full tensors)."""
    out = {}
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[name] = value.detach().clone()
    return out


def train_single_process(model: torch.nn.Module) -> list[float]:
    """The reference: the same steps on the whole global batch in one process. Returns the losses."""
    optimizer = make_optimizer(model)
    losses = []
    for ids in global_batches():
        optimizer.zero_grad()
        loss = next_token_loss(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class AllreduceRecorder:
    """DDP communication hook: the standard allreduce, after noting which gradients each bucket carries.

    The hook sees exactly what DDP's reducer communicates, so its numbers are the proof of what is
    synchronised (not just what requires grad)."""

    def __init__(self, names_by_param: dict[int, str]) -> None:
        self.names_by_param = names_by_param
        self.step_numels: list[list[int]] = []  # bucket sizes (elements) of each step
        self.names: set = set()  # every parameter whose gradient went through an allreduce

    # Annotations are real objects (no `from __future__ import annotations`): DDP checks them by identity.
    def hook(self, state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.step_numels[-1].append(bucket.buffer().numel())
        self.names.update(self.names_by_param[id(p)] for p in bucket.parameters())
        return allreduce_hook(None, bucket)  # None: the default process group


def _cross_rank_max_diff(state: dict[str, torch.Tensor]) -> float:
    """Largest difference between this rank's adapters and any other rank's (0 when synchronised)."""
    flat = torch.cat([t.reshape(-1) for _, t in sorted(state.items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max((g - flat).abs().max().item() for g in gathered)


def run(mode: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # 2 ranks on a small machine; also keeps the float math order fixed
    model = build_model()
    initial = adapter_state(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    total_params = sum(p.numel() for p in model.parameters())
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    recorder = None
    if mode == "ddp":
        names_by_param = {id(p): n for n, p in model.named_parameters()}
        wrapped = torch.nn.parallel.DistributedDataParallel(model)  # CPU: no device_ids
        recorder = AllreduceRecorder(names_by_param)
        wrapped.register_comm_hook(None, recorder.hook)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one FSDP unit per decoder layer, then the rest
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        raise ValueError(f"unknown mode {mode!r}")

    optimizer = make_optimizer(wrapped)
    losses = []
    for ids in global_batches():
        if recorder is not None:
            recorder.step_numels.append([])
        optimizer.zero_grad()
        loss = next_token_loss(wrapped, local_rows(ids, rank, world))
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # for the record only: the global loss, comparable with single-process
        losses.append(mean.item() / world)

    # Which parameters (as the wrapper holds them) got a gradient in the last step: the adapters, and only
    # they, if the wrapper's parameters are the ones the forward used.
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    final = adapter_state(model)  # the unwrapped module: its names carry no "module." prefix
    result = {
        "world_size": world,
        "adapters": final,
        "initial_adapters": initial,
        "losses": losses,
        "trainable": trainable,
        "params_with_grad": with_grad,
        "total_params": total_params,
        "lora_params": lora_params,
        "cross_rank_max_diff": _cross_rank_max_diff(final),
    }
    if mode == "ddp":
        module = wrapped.module
        result["ddp_requires_grad"] = [n for n, p in module.named_parameters() if p.requires_grad]
        result["allreduced_numels"] = recorder.step_numels
        result["allreduced_names"] = sorted(recorder.names)
        # The frozen base never gets a gradient and never moves.
        named = list(module.named_parameters())
        result["frozen_with_grad"] = [n for n, p in named if not p.requires_grad and p.grad is not None]
        result["frozen_changed"] = [
            n for n, p in named if n in base_before and not torch.equal(p, base_before[n])
        ]
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()  # rank 0 has written before any rank exits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--out", required=True, help="where rank 0 writes its result (torch.save)")
    args = parser.parse_args()
    run(args.mode, os.path.abspath(args.out))
    # The wrapped model (DDP's reducer, FSDP's hooks, the optimizer) released before the process group goes, while the
    # interpreter is whole (pytorch/pytorch#190489: gloo work left at exit aborts a rank).
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
