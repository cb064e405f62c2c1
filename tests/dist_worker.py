"""One process of a data-parallel learning run, for tests/test_distributed.py.

Run as ``python tests/dist_worker.py METHOD MODEL_DIR OUT`` (one process) or under
``torchrun --nproc_per_node 2`` (two): learns two tiny tasks with the same global batch and
writes, per rank, every state tensor (``rank-<r>.safetensors``) and the accuracies and losses
(``rank-<r>.json``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(method_name: str, model_dir: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file

    from conftest import make_task
    from sharecl import distributed as dist
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method
    from sharecl.train import TrainConfig, evaluate

    torch.set_num_threads(1)
    dist.init_distributed(torch.device("cpu"))
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16, eval_batch_size=16)
    options = {"share": {"r": 4, "lora_alpha": 8, "p": 2, "k": 4, "phi": 2}, "inflora": {"r": 4, "eps": 0.9},
               "sd-lora-kd": {"r": 4, "lora_alpha": 8}, "share-lm": {"r": 4, "lora_alpha": 8, "p": 2, "k": 4, "phi": 2}}[method_name]
    record = {"world_size": dist.world_size(), "losses": [], "accuracy": []}
    if method_name == "share-lm":  # generation tasks on the tiny Llama: answers of unequal length, so shards hold
        from conftest import tiny_lm  # unequal numbers of target tokens (the loss is weighted by them)
        from sharecl.generation.tasks import GenerationTask

        method = build_method("share", tiny_lm(), seed=0, **options)
        method.begin_stream(2)
        tasks = [GenerationTask(n, [(f"{n} {i}?", "yes" if i % 3 else "not at all") for i in range(24)], [], "exact-match")
                 for n in ("ask", "tell")]
        for t in tasks:
            record["losses"].append(method.learn(t, TrainConfig(steps=6, batch_size=8, lr=1e-2), progress=False)["final_loss"])
    else:
        method = build_method(method_name, load_encoder(model_dir, max_length=16), seed=0, **options)
        method.begin_stream(2)
        tasks = [make_task("a", n_per_class=16), make_task("b", n_per_class=16)]
        for t in tasks:
            record["losses"].append(method.learn(t, cfg, progress=False)["final_loss"])
            record["accuracy"].append([evaluate(lambda xs, n=s.name: method.logits(xs, n), s, 16) for s in tasks[: len(record["losses"])]])
    r = dist.rank()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in method.state_tensors().items()}, f"{out}/rank-{r}.safetensors")
    Path(out, f"rank-{r}.json").write_text(json.dumps(record))
    dist.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:4])
