"""Worker for test_lora_unshard (run by torchrun, 2 gloo processes): FSDP2-shard a tiny peft model on the CPU,
train one step, gather the full weights, restore the tree with ModuleTree on rank 0, merge; prints JSON."""

import json
import sys

import torch
import torch.distributed as dist
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from prunekit.builtin.lora.unshard import ModuleTree


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_tiny_llama(4, 4, layers=2).to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                            init_lora_weights=False))
    for n, p in peft.named_parameters():  # FSDP2 shards one dtype per group: train the adapters in bf16 here
        p.data = p.data.to(torch.bfloat16)
    tree = ModuleTree(peft)
    classes = {n: type(m) for n, m in peft.named_modules()}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(peft, mesh=mesh)
    sharded_classes = {type(m).__name__ for m in peft.modules()}
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(16).view(2, 8) + rank
    peft(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    probe = torch.arange(10).view(1, 10)
    with torch.no_grad():
        sharded = peft(input_ids=probe).logits.float()
    state = get_model_state_dict(peft, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tree.restore(state)
        classes_restored = {n: type(m) for n, m in peft.named_modules()} == classes
        with torch.no_grad():
            restored = peft(input_ids=probe).logits.float()
        merged = peft.merge_and_unload()
        with torch.no_grad():
            after = merged(input_ids=probe).logits.float()
        print(json.dumps({
            "fsdp_classes": sorted(c for c in sharded_classes if c.startswith("FSDP")),
            "classes_restored": classes_restored, "merged_in_place": merged is model,
            "dtensors_left": sum(type(p).__name__ == "DTensor" for p in merged.parameters()),
            "restored_vs_sharded": (restored - sharded).abs().max().item(),
            "merged_vs_sharded": (after - sharded).abs().max().item(),
            "merged_class": type(merged).__name__, "lora_left": sum("lora_" in n for n, _ in merged.named_parameters()),
            "dtype": str(next(merged.parameters()).dtype)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    main()
