"""Multi-seed study: does a rewritten model train better than its residual original, with error bars?

Runs ``examples/train_lm.py`` (the byte-level Llama on the Python stdlib) once per (seed, variant), each run
a process of its own with one torch thread, ``--workers`` of them at a time, compiled; then
``examples/upcycle_minilm.py`` (fine-tuning the pretrained MiniLM, upcycled) per (seed, variant). Every run
writes its JSON under ``--out``; a run whose JSON exists is not run again, so an interrupted study resumes
where it stopped. The summary compares each variant with the residual run *of the same seed* (same initial
function, same batches):

* final validation loss per variant, mean +- standard deviation over seeds;
* the paired difference to residual, mean with its 95 % interval (Student t over the seeds);
* tokens each run needed to reach the residual run's final validation loss;
* throughput (tokens/s of the compiled training step, the runs sharing the machine ``--workers`` at a time);
* MiniLM: held-out loss and top-1 retrieval after fine-tuning, and the training loss along the way.

    python -m benchmarks.seed_study                          # the study of benchmarks/training.md
    python -m benchmarks.seed_study --seeds 0,1 --steps 50 --minilm-steps 5 --out /tmp/study   # a quick try
    python -m benchmarks.seed_study --summarize-only          # tables and plots from the runs on disk

Writes ``seed_study.md`` and ``seed_study.json`` into ``--out`` and the plots into ``--plots``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("residual", "mhc", "frac", "hc")
LABELS = {"residual": "residual", "mhc": "mHC n=4", "frac": "Frac m=4", "hc": "HC n=4"}
COLORS = {"residual": "black", "mhc": "tab:red", "frac": "tab:blue", "hc": "tab:green"}

#: two-sided 95 % quantiles of Student's t, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        return float("nan")
    if df in T975:
        return T975[df]
    below = [k for k in T975 if k <= df]
    return T975[max(below)] if df <= 30 else 1.960


def mean_ci(values: list[float]) -> dict:
    """Mean, standard deviation and the 95 % interval of the mean (Student t) of ``values``."""
    k = len(values)
    mean = statistics.fmean(values) if values else float("nan")
    sd = statistics.stdev(values) if k > 1 else float("nan")
    half = t975(k - 1) * sd / math.sqrt(k) if k > 1 else float("nan")
    return dict(n=k, mean=mean, std=sd, lo=mean - half, hi=mean + half)


# --------------------------------------------------------------------------------------------- jobs

def lm_job(seed: int, variant: str, args) -> tuple[list[str], Path]:
    folder = Path(args.out) / "lm" / f"seed{seed}-{variant}"
    cmd = [sys.executable, str(ROOT / "examples" / "train_lm.py"), "--mode", "cpu", "--threads", "1",
           "--no-progress", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
           "--seed", str(seed), "--variants", variant, "--out", str(folder)]
    if args.compile:
        cmd.append("--compile")
    return cmd, folder / "train_lm_cpu.json"


def minilm_job(seed: int, variant: str, args) -> tuple[list[str], Path]:
    path = Path(args.out) / "minilm" / f"seed{seed}-{variant}.json"
    cmd = [sys.executable, str(ROOT / "examples" / "upcycle_minilm.py"), "--threads", "1",
           "--steps", str(args.minilm_steps), "--seed", str(seed), "--variants", variant,
           "--json", str(path)]
    return cmd, path


def run_jobs(jobs: list[tuple[str, list[str], Path]], workers: int, log_dir: Path) -> list[str]:
    """Runs the jobs whose result file is missing, ``workers`` at a time; returns the failures."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not j[2].exists()]
    log_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def one(job):
        name, cmd, _ = job
        with open(log_dir / f"{name}.log", "w") as log:
            t = time.perf_counter()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return name, rc, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc="runs") as bar:
        futures = [pool.submit(one, j) for j in todo]
        for f in as_completed(futures):
            name, rc, secs = f.result()
            bar.update(1)
            bar.write(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f} s")
            if rc != 0:
                failures.append(name)
    return failures


# ---------------------------------------------------------------------------------------- summary

def load_lm(out: Path) -> dict:
    """``{variant: {seed: result}}`` from the LM runs on disk."""
    runs: dict = {}
    for path in sorted((out / "lm").glob("seed*-*/train_lm_cpu.json")):
        seed, variant = path.parent.name[4:].split("-", 1)
        data = json.loads(path.read_text())
        result = data["results"][0]
        result["config"] = data["config"]
        runs.setdefault(variant, {})[int(seed)] = result
    return runs


def load_minilm(out: Path) -> dict:
    runs: dict = {}
    for path in sorted((out / "minilm").glob("seed*-*.json")):
        seed, variant = path.stem[4:].split("-", 1)
        runs.setdefault(variant, {})[int(seed)] = json.loads(path.read_text())["results"][0]
    return runs


def tokens_to_reach(result: dict, target: float):
    for _, tokens, value in result["val_points"][1:]:
        if value <= target:
            return tokens
    return None


def summarize_lm(runs: dict) -> dict:
    """Per variant: final validation loss over seeds, the paired difference to residual (same seed),
    tokens to reach residual's final loss, throughput."""
    ref = runs.get("residual", {})
    out = {}
    for variant in [v for v in VARIANTS if v in runs]:
        by_seed = runs[variant]
        seeds = sorted(by_seed)
        row = dict(seeds=seeds, final=mean_ci([by_seed[s]["final_val_loss"] for s in seeds]),
                   tokens_per_s=mean_ci([by_seed[s]["tokens_per_s"] for s in seeds]),
                   hc_params=by_seed[seeds[0]]["hc_params"], tokens=by_seed[seeds[0]]["tokens"])
        paired = [s for s in seeds if s in ref]
        if variant != "residual" and paired:
            row["paired_seeds"] = paired
            row["diff"] = mean_ci([by_seed[s]["final_val_loss"] - ref[s]["final_val_loss"] for s in paired])
            row["diff_by_seed"] = {s: by_seed[s]["final_val_loss"] - ref[s]["final_val_loss"] for s in paired}
            reach = {s: tokens_to_reach(by_seed[s], ref[s]["final_val_loss"]) for s in paired}
            row["reach_by_seed"] = reach
            got = [t / by_seed[s]["tokens"] for s, t in reach.items() if t is not None]
            row["reach_share"] = mean_ci(got) if got else None
            row["reached"] = len(got)
            row["speed_vs_residual"] = mean_ci([by_seed[s]["tokens_per_s"] / ref[s]["tokens_per_s"]
                                                for s in paired])
        out[variant] = row
    return out


def summarize_minilm(runs: dict) -> dict:
    ref = runs.get("residual", {})
    out = {}
    for variant in [v for v in VARIANTS if v in runs]:
        by_seed = runs[variant]
        seeds = sorted(by_seed)
        row = dict(seeds=seeds, loss_after=mean_ci([by_seed[s]["eval_loss_after"] for s in seeds]),
                   acc_after=mean_ci([by_seed[s]["acc_after"] for s in seeds]),
                   loss_before=by_seed[seeds[0]]["eval_loss_before"],
                   acc_before=by_seed[seeds[0]]["acc_before"],
                   max_rel_err=max(by_seed[s]["max_rel_err"] for s in seeds),
                   train_auc=mean_ci([statistics.fmean(by_seed[s]["train_losses"]) for s in seeds]),
                   wall_s=mean_ci([by_seed[s]["wall_s"] for s in seeds]))
        paired = [s for s in seeds if s in ref]
        if variant != "residual" and paired:
            row["diff_loss"] = mean_ci([by_seed[s]["eval_loss_after"] - ref[s]["eval_loss_after"]
                                        for s in paired])
            row["diff_acc"] = mean_ci([by_seed[s]["acc_after"] - ref[s]["acc_after"] for s in paired])
            row["diff_train_auc"] = mean_ci([statistics.fmean(by_seed[s]["train_losses"])
                                             - statistics.fmean(ref[s]["train_losses"]) for s in paired])
        out[variant] = row
    return out


def _pm(stat: dict, digits: int = 4) -> str:
    if stat is None or stat["n"] == 0:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _ci(stat: dict, digits: int = 4) -> str:
    if stat is None or stat["n"] < 2:
        return "—" if stat is None else f"{stat['mean']:+.{digits}f}"
    return f"{stat['mean']:+.{digits}f} [{stat['lo']:+.{digits}f}, {stat['hi']:+.{digits}f}]"


def lm_table(summary: dict) -> str:
    lines = ["| variant | seeds | + hc params | final val loss (mean ± std) | Δ vs residual, paired "
             "(mean [95 % CI]) | seeds below residual | tokens to reach residual's final loss (share of the "
             "run, mean; runs that reach it) | tokens/s (x residual) |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in summary.items():
        if variant == "residual":
            lines.append(f"| {LABELS[variant]} | {len(row['seeds'])} | 0 | {_pm(row['final'])} | — | — | 100 % "
                         f"| {row['tokens_per_s']['mean']:,.0f} |")
            continue
        below = sum(1 for d in row.get("diff_by_seed", {}).values() if d < 0)
        share = row.get("reach_share")
        reach = "—" if share is None else f"{share['mean']:.0%} ({row['reached']} of {len(row['paired_seeds'])})"
        if share is None and "paired_seeds" in row:
            reach = f"not reached (0 of {len(row['paired_seeds'])})"
        speed = row.get("speed_vs_residual")
        lines.append(
            f"| {LABELS[variant]} | {len(row['seeds'])} | {row['hc_params']:,} | {_pm(row['final'])} "
            f"| {_ci(row.get('diff'))} | {below} of {len(row.get('paired_seeds', []))} | {reach} "
            f"| {row['tokens_per_s']['mean']:,.0f} (x{speed['mean']:.2f}) |" if speed else
            f"| {LABELS[variant]} | {len(row['seeds'])} | {row['hc_params']:,} | {_pm(row['final'])} | — | — | — "
            f"| {row['tokens_per_s']['mean']:,.0f} |")
    return "\n".join(lines)


def minilm_table(summary: dict) -> str:
    lines = ["| variant | seeds | step 0: max rel. err. | held-out loss before -> after (mean ± std) "
             "| Δ after vs original, paired (mean [95 % CI]) | top-1 after (mean ± std) "
             "| Δ top-1, paired | mean train loss over the run, Δ vs original |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in summary.items():
        acc = row["acc_after"]
        acc_s = f"{acc['mean']:.1%} ± {acc['std']:.1%}" if acc["n"] > 1 else f"{acc['mean']:.1%}"
        dacc = row.get("diff_acc")
        dacc_s = "—" if dacc is None else (f"{dacc['mean']:+.1%} [{dacc['lo']:+.1%}, {dacc['hi']:+.1%}]"
                                           if dacc["n"] > 1 else f"{dacc['mean']:+.1%}")
        lines.append(f"| {LABELS[variant]} | {len(row['seeds'])} | {row['max_rel_err']:.1e} "
                     f"| {row['loss_before']:.4f} -> {_pm(row['loss_after'])} | {_ci(row.get('diff_loss'))} "
                     f"| {acc_s} | {dacc_s} | {_ci(row.get('diff_train_auc'))} |")
    return "\n".join(lines)


def plot_lm(runs: dict, summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    ref = runs.get("residual", {})
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        toks = [p[1] / 1e6 for p in by_seed[seeds[0]]["val_points"]]
        curves = [[p[2] for p in by_seed[s]["val_points"]] for s in seeds]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(toks))]
        sd = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0 for i in range(len(toks))]
        axes[0].plot(toks[1:], mean[1:], color=COLORS[variant], label=LABELS[variant])
        axes[0].fill_between(toks[1:], [m - s for m, s in zip(mean[1:], sd[1:])],
                             [m + s for m, s in zip(mean[1:], sd[1:])], color=COLORS[variant], alpha=0.15)
        if variant != "residual":
            paired = [s for s in seeds if s in ref]
            diffs = [[a[2] - b[2] for a, b in zip(by_seed[s]["val_points"], ref[s]["val_points"])]
                     for s in paired]
            if diffs:
                stats = [mean_ci([d[i] for d in diffs]) for i in range(len(toks))]
                axes[1].plot(toks[1:], [st["mean"] for st in stats[1:]], color=COLORS[variant],
                             label=LABELS[variant])
                if len(diffs) > 1:
                    axes[1].fill_between(toks[1:], [st["lo"] for st in stats[1:]], [st["hi"] for st in stats[1:]],
                                         color=COLORS[variant], alpha=0.15)
    axes[0].set_title("validation loss, mean ± std over seeds")
    axes[0].set_ylabel("nats / byte")
    axes[1].axhline(0.0, color="black", linewidth=1)
    axes[1].set_title("validation loss minus residual's (same seed): mean, 95 % CI")
    for ax in axes[:2]:
        ax.set_xlabel("training tokens (M)")
    order = [v for v in VARIANTS if v in summary and "diff" in summary[v]]
    for i, variant in enumerate(order):
        diffs = list(summary[variant]["diff_by_seed"].values())
        axes[2].scatter([i] * len(diffs), diffs, color=COLORS[variant], s=18)
        stat = summary[variant]["diff"]
        axes[2].errorbar([i + 0.15], [stat["mean"]], yerr=[[stat["mean"] - stat["lo"]], [stat["hi"] - stat["mean"]]]
                         if stat["n"] > 1 else None, fmt="o", color=COLORS[variant], capsize=4)
    axes[2].axhline(0.0, color="black", linewidth=1)
    axes[2].set_xticks(range(len(order)), [LABELS[v] for v in order])
    axes[2].set_title("final validation loss minus residual's: each seed, mean and 95 % CI")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_minilm(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        curves = [by_seed[s]["train_losses"] for s in seeds]
        steps = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(steps)]
        axes[0].plot(range(1, steps + 1), mean, color=COLORS[variant], label=LABELS[variant] if variant != "residual"
                     else "original (residual)")
        after = [by_seed[s]["eval_loss_after"] for s in seeds]
        i = VARIANTS.index(variant)
        axes[1].scatter([i] * len(after), after, color=COLORS[variant], s=18)
    axes[0].set_title("MiniLM fine-tuning: training loss, mean over seeds")
    axes[0].set_xlabel("step")
    axes[1].set_xticks(range(len(VARIANTS)), [LABELS[v] for v in VARIANTS])
    axes[1].set_title("held-out loss after fine-tuning, each seed")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(out: Path, plots: Path, command: str = "") -> dict:
    lm_runs, mini_runs = load_lm(out), load_minilm(out)
    lm, mini = summarize_lm(lm_runs), summarize_minilm(mini_runs)
    parts = ["# Multi-seed study", "", f"`{command or 'python -m benchmarks.seed_study'}`", ""]
    if lm:
        cfg = next(iter(next(iter(lm_runs.values())).values()))["config"]
        title = (f"byte-level Llama d={cfg['d']} L={cfg['layers']} seq={cfg['seq']}, "
                 f"{cfg['steps'] * cfg['batch'] * cfg['seq'] / 1e6:.2f}M tokens per run, "
                 f"{len(next(iter(lm_runs.values())))} seeds")
        plots.mkdir(parents=True, exist_ok=True)
        plot_lm(lm_runs, lm, plots / "seed_study_lm.png", title)
        parts += [f"## Byte-level LM ({title})", "", lm_table(lm), "", "![](../plots/seed_study_lm.png)", ""]
    if mini:
        plots.mkdir(parents=True, exist_ok=True)
        plot_minilm(mini_runs, plots / "seed_study_minilm.png")
        parts += ["## Upcycled MiniLM, fine-tuned", "", minilm_table(mini), "",
                  "![](../plots/seed_study_minilm.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed_study.md").write_text("\n".join(parts))
    (out / "seed_study.json").write_text(json.dumps(dict(lm=lm, minilm=mini), indent=1))
    return dict(lm=lm, minilm=mini, markdown="\n".join(parts))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.seed_study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0-4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    ap.add_argument("--steps", type=int, default=2000, help="LM steps of 8 x 128 tokens (default 2000 = 2.05M)")
    ap.add_argument("--warmup", type=int, default=100, help="LM warm-up steps (default 100)")
    ap.add_argument("--eval-every", type=int, default=100, help="LM validation every N steps (default 100)")
    ap.add_argument("--eval-batches", type=int, default=16, help="LM validation batches of 8 (default 16)")
    ap.add_argument("--minilm-steps", type=int, default=60, help="MiniLM fine-tuning steps (default 60; 0: skip)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="LM runs eager")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "seed_study"))
    ap.add_argument("--plots", default=str(ROOT / "benchmarks" / "plots"))
    ap.add_argument("--summarize-only", action="store_true", help="no runs: tables and plots from disk")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    command = "python -m benchmarks.seed_study " + " ".join(sys.argv[1:] if argv is None else argv)
    failures = []
    if not args.summarize_only:
        # the slowest variants first, so that the two workers finish together
        order = sorted(args.variants, key=lambda v: ("mhc", "hc", "frac", "residual").index(v))
        jobs = [(f"lm-seed{s}-{v}", *lm_job(s, v, args)) for s in args.seeds for v in order]
        if args.minilm_steps > 0:
            jobs += [(f"minilm-seed{s}-{v}", *minilm_job(s, v, args)) for s in args.seeds for v in order]
        failures = run_jobs(jobs, args.workers, out / "logs")
    result = summarize(out, Path(args.plots), command)
    print(result["markdown"])
    if failures:
        print(f"failed runs (logs in {out / 'logs'}): {', '.join(failures)}", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
