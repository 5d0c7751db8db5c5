"""Runs compared (reporting/experiments.py, scripts/sweep.py) on `dvc exp show --json` output of
the form DVC 3.67 writes."""
import json

from reporting.experiments import runs, sweep_rows, variants_reached, write_comparisons
from scripts.sweep import SWEEPS, override, points, queue_commands, worker_environment

VARIANTS = {"lora": {"bridge": "gated_cross", "peft": "lora"},
            "adapter": {"bridge": "gated_cross", "peft": "adapter"},
            "visual_prefix": {"bridge": "visual_prefix", "peft": "lora"}}


def data(rank=8, method="beam", cider=(0.5, 0.4, 0.3), extra_variants=None):
    variants = {**VARIANTS, **(extra_variants or {})}
    metrics = {f"metrics/{v}.json": {"data": {"cider": c, "clipscore": 0.7, "cider_blind": 0.1}}
               for v, c in zip(variants, cider + (0.2,) * len(variants))}
    metrics.update({f"live/train/{v}/metrics.json": {"data": {"trainable_params": 1000 + rank}}
                    for v in variants})
    return {"params": {"params.yaml": {"data": {
        "variants": variants, "peft": {"lora": {"rank": rank}, "adapter": {"size": 64}},
        "decode": {"method": method}}}}, "metrics": metrics}


def exp(name, **kw):
    return {"revs": [{"rev": f"{name}-sha", "name": name, "data": data(**kw), "error": None}],
            "name": name}


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": data(), "experiments": None},
    {"rev": "abc1234def", "name": "main", "data": data(), "experiments": [
        exp("lora_rank-16", rank=16, cider=(0.6, 0.4, 0.35)),
        exp("lora_rank-4", rank=4, cider=(0.45, 0.4, 0.28)),
        exp("decoding-greedy", method="greedy", cider=(0.48, 0.39, 0.29)),
        exp("methods-bridge_only", extra_variants={"bridge_only": {"bridge": "gated_cross",
                                                                    "peft": "none"}}),
        {"revs": [{"rev": "bad", "name": "lora_rank-32", "data": {}, "error": {"msg": "failed"}}]},
    ]},
]


def test_runs_are_the_baseline_and_its_experiments():
    all_runs = runs(EXP_SHOW)
    assert [r["name"] for r in all_runs] == ["main", "lora_rank-16", "lora_rank-4",
                                              "decoding-greedy", "methods-bridge_only"]
    assert all_runs[1]["params"]["peft.lora.rank"] == 16


def test_a_sweep_shows_the_variants_its_params_reach():
    assert variants_reached(["peft.lora.rank"], VARIANTS) == ["lora", "visual_prefix"]
    assert variants_reached(["bridge.visual_prefix.hidden"], VARIANTS) == ["visual_prefix"]
    assert variants_reached(["decode.method"], VARIANTS) == sorted(VARIANTS)
    rows = sweep_rows(runs(EXP_SHOW), "lora_rank")
    assert [(r["experiment"], r["variant"]) for r in rows] == [
        ("baseline", "lora"), ("baseline", "visual_prefix"), ("lora_rank-16", "lora"),
        ("lora_rank-16", "visual_prefix"), ("lora_rank-4", "lora"), ("lora_rank-4", "visual_prefix")]
    assert rows[2]["changes"] == {"peft.lora.rank": 16} and rows[2]["cider"] == 0.6
    assert rows[2]["trainable_params"] == 1016 and rows[0]["changes"] == {}
    methods = sweep_rows(runs(EXP_SHOW), "methods")
    assert [(r["experiment"], r["variant"]) for r in methods] == [
        ("methods-bridge_only", "bridge_only")]
    assert sweep_rows(runs(EXP_SHOW), "prefix_length") == []


def test_comparisons_are_written_for_sweeps_with_experiments(tmp_path):
    extra = lambda run, variant: {"caption_words": 7.5}   # noqa: E731
    done = write_comparisons(EXP_SHOW, ["lora_rank", "decoding", "adapter_size"], tmp_path, extra)
    assert sorted(done) == ["decoding", "lora_rank"]
    rows = json.loads((tmp_path / "decoding.json").read_text())
    assert len(rows) == 2 * 3 and rows[-1]["caption_words"] == 7.5   # baseline + greedy, 3 variants
    assert (tmp_path / "lora_rank.png").stat().st_size > 1000


def test_a_sweep_whose_baseline_is_not_this_run_is_flagged_stale():
    from reporting.report import stale_baseline
    rows = [{"experiment": "baseline", "variant": "lora", "cider": 1.3},
            {"experiment": "baseline", "variant": "adapter", "cider": 1.2},
            {"experiment": "rank16", "variant": "lora", "cider": 1.4}]
    now = lambda **cider: {v: {"metrics": {"cider": c}} for v, c in cider.items()}   # noqa: E731
    assert stale_baseline(rows, now(lora=1.3, adapter=1.2)) == []
    assert stale_baseline(rows, now(lora=1.5, adapter=1.2)) == ["lora"]
    assert stale_baseline(rows, now(lora=1.3)) == ["adapter"]   # a variant no longer trained


def test_sweeps_queue_one_named_experiment_per_point():
    assert list(points("lora_rank")) == ["4", "8", "16", "32"]
    commands = queue_commands("decoding")
    assert commands[1] == ["dvc", "exp", "run", "--queue", "-n", "decoding-beam3",
                           "-S", "decode.method=beam", "-S", "decode.beam_size=3"]
    assert override("peft.lora.targets", ["c_attn", "mlp.c_fc"]) == "peft.lora.targets=[c_attn,mlp.c_fc]"
    assert override("+variants.x", {"bridge": "cross", "peft": "lora"}) == \
        "+variants.x={bridge:cross,peft:lora}"
    names = [c[c.index("-n") + 1] for s in SWEEPS for c in queue_commands(s)]
    assert len(names) == len(set(names)) and all(".." not in n and " " not in n for n in names)


def test_queue_workers_share_the_cores_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_environment(2, {})["OMP_NUM_THREADS"] == "4"
    assert worker_environment(16, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert worker_environment(2, {"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"


def test_the_queries_ablation_and_the_gate_sweep_set_real_params():
    """The 2 x 2 ablation: the baseline's lora (gated cross) and visual_prefix variants on image
    tokens, the `queries` experiment's on learned queries; every key a params.yaml one."""
    from common.params import load_params
    from tests.test_dvc_yaml import REPO
    assert queue_commands("queries") == [
        ["dvc", "exp", "run", "--queue", "-n", "queries-q32",
         "-S", "bridge.gated_cross.queries=32", "-S", "bridge.visual_prefix.queries=32"]]
    assert variants_reached(list(points("queries")["q32"]), VARIANTS) == sorted(VARIANTS)
    assert [c[5] for c in queue_commands("gate_init")] == ["gate_init-0.5", "gate_init-1.0"]
    params = load_params(REPO / "params.yaml")
    for sweep in ("queries", "gate_init"):
        for settings in points(sweep).values():
            for key in settings:
                section = params
                for part in key.split(".")[:-1]:
                    section = section[part]
                assert key.split(".")[-1] in section, key
