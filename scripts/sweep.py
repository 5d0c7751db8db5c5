"""Queue a named sweep of experiments (the reports' ablations) through DVC's experiment queue.

    python -m scripts.sweep lora_rank              # queue: dvc exp run --queue -n lora_rank-16 -S ...
    python -m scripts.sweep lora_rank --run -j 2   # queue, run with `dvc queue start -j 2`, wait
    python -m scripts.sweep --list                 # the sweeps and their experiments
    python -m scripts.compare                      # then: tables and plots of every sweep

Each point of a sweep is one experiment named `<sweep>-<point>` on top of the current commit;
DVC re-runs only the stages its params reach (a decoding sweep re-runs decode and score, never
training). `dvc exp show`, `dvc exp show --csv`, `dvc metrics diff` and `dvc plots diff` compare
them; `dvc exp apply <name>` brings one into the workspace. With `--run -j N` each worker gets
its share of the CPU cores as torch's thread count (OMP_NUM_THREADS, unless set): N workers with
a thread per core each would contend for the cores and run slower than one at a time.
"""
import argparse
import itertools
import json
import os
import sys
import time

from scripts.dvc_command import dvc

LORA_ALL = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
# sweep -> its points: {point name: {params key: value}} (a grid: {key: [values]})
SWEEPS = {
    "lora_rank": {"peft.lora.rank": [4, 8, 16, 32]},
    "lora_placement": {"attn": {"peft.lora.targets": ["c_attn"]},
                       "attn_mlp": {"peft.lora.targets": LORA_ALL},
                       "attn_mlp_head": {"peft.lora.targets": LORA_ALL + ["lm_head"]}},
    "adapter_size": {"peft.adapter.size": [64, 128]},
    "prefix_length": {"peft.prefix_tuning.length": [10, 32, 64]},
    "decoding": {"greedy": {"decode.method": "greedy"},
                 "beam3": {"decode.method": "beam", "decode.beam_size": 3},
                 "beam5": {"decode.method": "beam", "decode.beam_size": 5},
                 "beam10": {"decode.method": "beam", "decode.beam_size": 10},
                 "nucleus": {"decode.method": "sample", "decode.top_p": 0.9}},
    "decode_length": {"decode.max_new_tokens": [30, 50]},
    "repetition": {"off": {"decode.no_repeat_ngram_size": 0},
                   "ngram3": {"decode.no_repeat_ngram_size": 3},
                   "penalty1_2": {"decode.repetition_penalty": 1.2}},
    # The 2 x 2 ablation {visual prefix, gated cross-attention} x {image tokens, 32 learned
    # queries}, with LoRA: the baseline's `visual_prefix` and `lora` variants are its image-token
    # cells, this experiment's the queries cells (the other gated_cross variants move too).
    "queries": {"q32": {"bridge.gated_cross.queries": 32, "bridge.visual_prefix.queries": 32}},
    # the gates' initial value: the baseline's 0 (Flamingo: the plain language model at first)
    # against gates open from the first step
    "gate_init": {"bridge.gated_cross.gate_init": [0.5, 1.0]},
    # the methods and bridges no default variant trains, each added as a variant
    "methods": {name: {f"+variants.{name}": {"bridge": bridge, "peft": peft}}
                for name, bridge, peft in (
                    ("bridge_only", "gated_cross", "none"),
                    ("prompt_tuning", "gated_cross", "prompt_tuning"),
                    ("adaption_prompt", "gated_cross", "adaption_prompt"),
                    ("cross_lora", "cross", "lora"))},
}


def points(sweep):
    """{point name: {key: value}} of a sweep: its named points, or its grid's combinations."""
    spec = SWEEPS[sweep]
    if all(isinstance(v, dict) for v in spec.values()):
        return spec
    keys = list(spec)
    return {"_".join(str(v) for v in combo): dict(zip(keys, combo))
            for combo in itertools.product(*(spec[k] for k in keys))}


def override(key, value):
    """A `-S` override in DVC's (hydra's) syntax: key=value, lists and mappings inline."""
    if isinstance(value, dict):
        text = "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ",".join(map(str, value)) + "]"
    else:
        text = json.dumps(value) if isinstance(value, bool) else str(value)
    return f"{key}={text}"


def queue_commands(sweep):
    return [["dvc", "exp", "run", "--queue", "-n", f"{sweep}-{name}",
             *itertools.chain.from_iterable(("-S", override(k, v)) for k, v in settings.items())]
            for name, settings in points(sweep).items()]


def wait_for_queue(names, poll=10):
    """Until none of the experiments `names` is queued or running in `dvc queue status` (columns:
    task, name, created, status); returns those that failed."""
    while True:
        status = dvc("queue", "status", capture=True)
        rows = [line.split() for line in status.splitlines()]
        state = {row[1]: row[-1] for row in rows if len(row) >= 4 and row[1] in names}
        if not any(s in ("Queued", "Running") for s in state.values()):
            return sorted(n for n, s in state.items() if s == "Failed")
        time.sleep(poll)


def worker_environment(jobs, environ=None):
    """The environment of `dvc queue start -j jobs`: each worker's torch threads its share of the
    cores (OMP_NUM_THREADS), unless the caller set it."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="*", metavar="SWEEP", help=f"one or more of: {', '.join(SWEEPS)}")
    ap.add_argument("--list", action="store_true", help="print the sweeps and their experiments")
    ap.add_argument("--run", action="store_true", help="then run the queue and wait for it")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel workers (--run)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sweeps if s not in SWEEPS]
    if unknown:
        ap.error(f"unknown sweep(s) {unknown}; known: {', '.join(SWEEPS)}")
    if args.list or not args.sweeps:
        for sweep in SWEEPS:
            for command in queue_commands(sweep):
                print(" ".join(command))
        return 0
    names = []
    for sweep in args.sweeps:
        for command in queue_commands(sweep):
            print("+", " ".join(command), flush=True)
            dvc(*command[1:])
            names.append(command[command.index("-n") + 1])
    if args.run:
        env = worker_environment(args.jobs)
        print(f"+ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} dvc queue start -j {args.jobs}", flush=True)
        dvc("queue", "start", "-j", str(args.jobs), env=env)
        failed = wait_for_queue(names)
        if failed:
            print(f"failed experiments: {failed} (`dvc queue logs NAME` tells why)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
