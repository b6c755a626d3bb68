"""Inner-loop throughput: the vmapped meta-batch against a per-episode loop.

    python -m simulations.bench_inner_loop [--device cpu|cuda] [--repeats 5]

5-way 1-shot episodes (5 query records per class), image + audio, the
default model; one Reptile site update (``inner_steps`` SGD steps per
episode) is timed for meta-batches of 1, 8, 32 and 128 episodes, both ways.
Prints a markdown table: episodes per second (median of ``--repeats`` runs)
and the speed-up, with both paths timed in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.algorithms import get_algorithm
from common.algorithms.reference import reptile_reference
from common.config import Config, DataConfig, EpisodeConfig
from common.task import Task


def random_episodes(task: Task, *, episodes: int, ways: int, shots: int, query_shots: int,
                    generator: torch.Generator) -> dict:
    """Episodes in the engine's layout with random contents (throughput does not depend on them)."""

    def batch(per_class: int) -> dict:
        n = ways * per_class
        inputs, masks = {}, {}
        for name, spec in task.schema.items():
            shape = (episodes, n, *spec.shape)
            if spec.kind == "tokens":
                inputs[name] = torch.randint(0, spec.vocab_size, shape, generator=generator)
            else:
                inputs[name] = torch.randn(shape, generator=generator, dtype=task.dtype)
            masks[name] = torch.ones(episodes, n, dtype=torch.bool)
        labels = torch.arange(ways).repeat_interleave(per_class).expand(episodes, n).contiguous()
        batch = {"inputs": inputs, "masks": masks, "labels": labels,
                 "weights": torch.ones(episodes, n, dtype=task.dtype)}
        return {k: ({m: t.to(task.device) for m, t in v.items()} if isinstance(v, dict) else v.to(task.device))
                for k, v in batch.items()}

    return {"support": batch(shots), "query": batch(query_shots)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(task: Task, *, meta_batch: int, repeats: int, inner_steps: int) -> tuple[float, float]:
    algorithm = get_algorithm("reptile")
    params = {k: v.to(task.device) for k, v in task.initial_parameters(seed=0).items()}
    hparams = algorithm.hparams(inner_steps=inner_steps, inner_lr=0.1)
    episodes = random_episodes(task, episodes=meta_batch, ways=5, shots=1, query_shots=5,
                               generator=torch.Generator().manual_seed(meta_batch))

    def vectorized():
        algorithm.client_update(model=task.model, params=params, episodes=episodes, hparams=hparams)

    def looped():
        reptile_reference(model=task.model, params=params, episodes=episodes, hparams=hparams)

    timings = {"vmap": [], "loop": []}
    for fn in (vectorized, looped):  # warm-up
        fn()
    for _ in range(repeats):
        # Interleaved so that drift in machine load hits both paths alike.
        for name, fn in (("vmap", vectorized), ("loop", looped)):
            _sync(task.device)
            start = time.perf_counter()
            fn()
            _sync(task.device)
            timings[name].append(time.perf_counter() - start)
    return meta_batch / statistics.median(timings["vmap"]), meta_batch / statistics.median(timings["loop"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-batches", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(data=DataConfig(modalities=("image", "audio")), episodes=EpisodeConfig(ways=5, shots=1))
    task = Task(config, device=args.device)
    name = torch.cuda.get_device_name(task.device) if task.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Reptile site update, 5-way 1-shot, image+audio, {args.inner_steps} inner steps, {name}, "
          f"median of {args.repeats}")
    print("| meta-batch | vmap episodes/s | loop episodes/s | vmap / loop |")
    print("|---:|---:|---:|---:|")
    for meta_batch in (int(x) for x in args.meta_batches.split(",")):
        fast, slow = measure(task, meta_batch=meta_batch, repeats=args.repeats, inner_steps=args.inner_steps)
        print(f"| {meta_batch} | {fast:.1f} | {slow:.1f} | {fast / slow:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
