"""Runs compared: the sweeps that scripts/sweep.py queued (experiments named `<sweep>-<point>`),
read from `dvc exp show --json`, as one table and one figure per sweep next to the baseline
commit: the params each experiment changed, and the scores of the variants those params reach.
"""
from pathlib import Path

from common.atomic import write_json
from reporting.attention_maps import pyplot, save_figure

SCORES = (("cider", "CIDEr"), ("clipscore", "CLIPScore"), ("cider_blind", "blind CIDEr"))


def flat(tree, prefix=""):
    """{"a.b": value} of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _run(name, rev, data):
    params = flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()}
    return {"name": name, "rev": rev, "params": params, "metrics": metrics}


def runs(exp_show):
    """The baseline commit (first) and its experiments, from the parsed `dvc exp show --json`:
    [{"name", "rev", "params": {flat key: value}, "metrics": {file: {key: value}}}]."""
    baseline = next(entry for entry in exp_show if entry.get("rev") != "workspace")
    out = [_run(baseline.get("name") or baseline["rev"][:7], baseline["rev"], baseline["data"])]
    for exp in baseline.get("experiments") or []:
        for rev in exp.get("revs") or []:
            if rev.get("data") and not rev.get("error"):
                out.append(_run(rev.get("name") or rev["rev"][:7], rev["rev"], rev["data"]))
    return out


def changed(run, baseline):
    """{key: value} of the params `run` sets otherwise than `baseline`."""
    return {k: v for k, v in run["params"].items() if baseline["params"].get(k) != v}


def variants_reached(keys, variants):
    """The variants a change of params `keys` re-trains or re-decodes: a bridge's or a method's
    settings reach the variants that use it, a variant's entry itself, anything else all."""
    reached = set()
    for key in keys:
        parts = key.split(".")
        if parts[0] == "variants":
            reached.add(parts[1])
        elif parts[0] in ("bridge", "peft") and len(parts) > 1:
            field = "bridge" if parts[0] == "bridge" else "peft"
            reached |= {n for n, v in variants.items() if v.get(field) == parts[1]}
        else:
            return sorted(variants)
    return sorted(reached)


def variants_of(run):
    """{name: {"bridge", "peft"}} of the variants a run trained."""
    out = {}
    for key, value in run["params"].items():
        parts = key.split(".")
        if parts[0] == "variants" and len(parts) == 3:
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def sweep_rows(all_runs, sweep, extra=None):
    """One row per (experiment of `sweep`, variant it reaches), the baseline's first: experiment,
    changes, variant, the scores, trainable params and, from `extra(run, variant)`, any more."""
    baseline = all_runs[0]
    members = [r for r in all_runs[1:] if r["name"].startswith(f"{sweep}-")]
    if not members:
        return []
    keys = sorted({k for r in members for k in changed(r, baseline)})
    rows = []
    for run in [baseline] + members:
        variants = variants_of(run)
        for variant in variants_reached(keys, variants):
            if variant not in variants:
                continue
            scores = run["metrics"].get(f"metrics/{variant}.json", {})
            train = run["metrics"].get(f"live/train/{variant}/metrics.json", {})
            rows.append({"experiment": run["name"] if run is not baseline else "baseline",
                         "changes": {k: v for k, v in changed(run, baseline).items()},
                         "variant": variant, **{k: scores.get(k) for k, _ in SCORES},
                         "trainable_params": train.get("trainable_params"),
                         **(extra(run, variant) if extra else {})})
    return rows


def plot_sweep(path, sweep, rows):
    """CIDEr (the blind baseline in grey) and CLIPScore of every row, by experiment."""
    plt = pyplot()
    labels = [f"{r['experiment']} / {r['variant']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(rows) + 1.6))
    y = range(len(rows))
    colours = ["tab:orange" if r["experiment"] == "baseline" else "tab:blue" for r in rows]
    axes[0].barh(y, [r["cider"] or 0 for r in rows], color=colours)
    axes[0].barh(y, [r["cider_blind"] or 0 for r in rows], color="tab:gray", height=0.35,
                 label="blind (shuffled images)")
    axes[0].set_title(f"{sweep}: val CIDEr (baseline in orange)")
    axes[0].legend(fontsize=8)
    axes[1].barh(y, [r["clipscore"] or 0 for r in rows], color=colours)
    axes[1].set_title("val CLIPScore")
    for ax in axes:
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def write_comparisons(exp_show, sweeps, out_dir, extra=None):
    """comparisons/<sweep>.json (the rows) and <sweep>.png for every sweep with experiments;
    returns {sweep: rows}."""
    all_runs = runs(exp_show)
    done = {}
    for sweep in sweeps:
        rows = sweep_rows(all_runs, sweep, extra)
        if rows:
            write_json(Path(out_dir) / f"{sweep}.json", rows)
            plot_sweep(Path(out_dir) / f"{sweep}.png", sweep, rows)
            done[sweep] = rows
    return done
