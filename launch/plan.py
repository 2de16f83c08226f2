"""Memory planner: the bytes a training step holds on each GPU, for every train.recompute setting.

    python launch/plan.py +model=sb7b parallel=zero3 --world 8 data.seq_len=8192 train.global_batch=16
    python launch/plan.py +model=sb76b parallel=zero3 --world 16 train.micro_batch=1 --json plan.json

Takes the Hydra overrides of launch/pretrain.py. Prints, per rank: weights, gradients, optimizer
state and gathered weights (with pipeline parallelism per stage, and the 1F1B bubble); for each recompute setting the activations, logits and loss, what the
worst moment of the step holds (gradients, weight copies, activations and temporaries), the peak
and whether it fits the GPU; the sequence-parallel and expert all-to-all traffic, how the ZeRO
and expert groups lie over nodes (two-level collectives); and the smallest data-parallel size
that fits. Nothing is allocated:
the model runs on the meta device (parallel/plan.py; rules and checks in docs/PLANNER.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from pretrain import available_models, load_config


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="launch/plan.py", usage="%(prog)s +model=NAME [overrides] [options]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="models: " + ", ".join(available_models()))
    parser.add_argument("--world", type=int, help="ranks to plan for: world = dp x pp x sp; parallel.ep "
                                                  "is carved out of dp (default: parallel.dp x pp x sp, "
                                                  "else ep x pp x sp)")
    parser.add_argument("--ranks-per-node", type=int, default=0,
                        help="GPUs per node, for how the groups lie over nodes (default parallel.ranks_per_node, "
                             "else 8)")
    parser.add_argument("--gpu-mem-gib", type=float, default=141.0, help="memory of one GPU (default 141, an H200)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the step's precision and kernels follow the device (default cuda)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unknown option {unknown[0]} (Hydra overrides look like train.micro_batch=1)")
    if args.ranks_per_node < 0:
        parser.error(f"--ranks-per-node must be >= 0, got {args.ranks_per_node}")
    if args.world is not None and args.world < 1:
        parser.error(f"--world must be >= 1, got {args.world}")
    if not args.gpu_mem_gib > 0:
        parser.error(f"--gpu-mem-gib must be > 0, got {args.gpu_mem_gib}")
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    cfg = load_config(overrides)
    from parallel.plan import GiB, check_fits, format_plan, plan_memory, smallest_dp

    par = cfg.parallel
    rest = par.pp * par.sp
    world = args.world or (par.dp or par.ep) * rest
    if world % rest or (par.dp and par.dp * rest != world):
        raise SystemExit(f"error: --world {world} is not parallel.dp={par.dp or 'auto'} x pp={par.pp} x "
                         f"sp={par.sp}")
    gpu = int(args.gpu_mem_gib * GiB)
    start = time.perf_counter()
    try:
        plan = plan_memory(cfg, world // rest, args.device)
        smallest = smallest_dp(cfg, gpu, device_type=args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(format_plan(plan, gpu))
    if par.sp > 1:
        from parallel.sequence.volume import format_volume, step_volume

        local = cfg.train.global_batch // (world // rest)
        element = 2 if args.device == "cuda" and cfg.train.precision != "fp32" else 4
        volume = step_volume(cfg, plan.micro_batch, local // plan.micro_batch, element)
        print(format_volume(volume))
    ep_bytes = 0
    if par.ep > 1:
        from parallel.expert import step_volume as expert_volume

        local = cfg.train.global_batch // (world // rest)
        element = 2 if args.device == "cuda" and cfg.train.precision != "fp32" else 4
        ep_bytes = expert_volume(cfg, plan.micro_batch * cfg.data.seq_len // par.sp, local // plan.micro_batch, element)
        print(f"expert all-to-all (ep {par.ep}): {ep_bytes / GiB:.2f} GiB sent per rank per step (balanced routing; "
              f"forward and backward, dispatch and combine)")
    if world > 1:
        from parallel.plan import node_layout

        try:
            print("\n".join(node_layout(cfg, world, args.ranks_per_node or par.ranks_per_node or min(world, 8),
                                         ep_bytes)))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        check_fits(plan, gpu)
        print(f"train.recompute={plan.recompute} fits, {(gpu - plan.peak) / GiB:.1f} GiB to spare")
    except ValueError as e:
        print(f"train.recompute={plan.recompute}: {e}")
    stage = par.zero_stage if par.zero_stage >= 0 else "auto"
    print(f"smallest dp that fits: {smallest or 'none up to 4096'} (parallel.zero_stage={stage}, "
          f"train.recompute={plan.recompute}, the batch settings above)")
    print(f"planned in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            sp_bytes = volume["step"] if par.sp > 1 else 0
            json.dump({**plan.to_dict(), "gpu_bytes": gpu, "fits": plan.peak <= gpu, "smallest_dp": smallest,
                       "sp_bytes_per_step": sp_bytes, "ep_bytes_per_step": ep_bytes}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
