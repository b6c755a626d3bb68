"""Experiments made of several simulations: algorithm comparison, privacy sweeps.

    metafed compare        --config FILE [--set ...]
    metafed privacy-sweep  --config FILE [--set ...] [--epsilons inf,8,4,2,1] [--levels record,client]
    metafed plan-privacy   --config FILE [--set ...] --target-epsilon 4 [--level record|client]

Every run is an ordinary ``metafed simulate`` run (same seed, sites and
budget; only the varied setting changes) written under one experiment folder
with a markdown table, a JSON file of the numbers and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError, validate

ALGORITHMS = ("fedavg", "reptile", "fomaml", "maml", "metasgd", "protonet")
# ``none`` (no training, the random initialization) may be run by name too;
# every comparison table has its row anyway, from the runs' own final reports.
SELECTABLE = ("none", *ALGORITHMS)


class RunFailed(RuntimeError):
    """One of the experiment's simulations did not complete."""


class SomeRunsFailed(RuntimeError):
    """The experiment's table was written, but some of its runs ended as failed (their rows say why)."""


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_one(config: Config, *, name: str, output_dir: Path, keep_failed: bool = False) -> Path:
    """Run one simulation in the foreground; return its run directory.

    ``keep_failed``: a run that ended as failed (exit code 1, its summary.json
    says why) is returned too, as long as it reached a meta-test: under
    heavy noise a model that diverges is a result of the experiment, not a
    reason to drop the runs still to come.
    """
    from simulations.runner import simulate

    output_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, name=name, output_dir=str(output_dir))
    code = simulate(config)
    runs = sorted(output_dir.glob(f"{name}-*"))
    if keep_failed and code == 1 and runs and any(r.get("meta_test") for r in read_metrics(runs[-1])):
        return runs[-1]
    if code != 0 or not runs:
        raise RunFailed(f"the run '{name}' failed (exit code {code}); see its output above")
    return runs[-1]


def run_status(run_dir: Path) -> tuple[str, str]:
    """(status, reason) from a run's summary.json; reason empty when it completed."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return "failed", "no readable summary.json"
    return str(summary.get("status", "failed")), str(summary.get("reason", ""))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    from simulations.plots import read_metrics as read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


def final_meta_test(run_dir: Path) -> dict[str, Any]:
    for record in reversed(read_metrics(run_dir)):
        if record.get("meta_test"):
            return record["meta_test"]
    raise RunFailed(f"{run_dir} has no meta-test result")


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{digits}f}"
    return str(x)


# ---------------------------------------------------------------- compare
def compare(config: Config, *, algorithms: tuple[str, ...] = ALGORITHMS) -> Path:
    """Each algorithm under the same seed, sites and rounds; a table and two plots."""
    out = Path(config.output_dir) / f"{config.name}-compare-{_timestamp()}"
    rows = []
    for algorithm in algorithms:
        cfg = dataclasses.replace(config, algorithm=dataclasses.replace(config.algorithm, name=algorithm))
        run_dir = run_one(cfg, name=algorithm, output_dir=out / "runs")
        history = read_metrics(run_dir)
        final = final_meta_test(run_dir)
        rows.append({
            "algorithm": algorithm,
            "accuracy": final["accuracy"],
            "ci95": final["ci95"],
            "worst_decile": final["worst_decile"],
            "raw_1nn": final.get("raw_1nn", math.nan),
            "random_init": final.get("random_init", math.nan),
            "random_init_ci95": (final.get("ablation_ci95") or {}).get("random_init", math.nan),
            "bytes": sum(r.get("bytes_sent", 0) + r.get("bytes_received", 0) for r in history),
            "seconds": history[-1].get("elapsed", math.nan),
            "run_dir": str(run_dir),
            "curve": [(r["round"], r["meta_test"]["accuracy"],
                       sum(h.get("bytes_sent", 0) + h.get("bytes_received", 0) for h in history[: i + 1]))
                      for i, r in enumerate(history) if r.get("meta_test")],
        })
    lines = [
        f"Held-out 5-way {config.episodes.shots}-shot accuracy after {config.federation.rounds} rounds "
        f"({config.federation.sites_per_round} sites per round, seed {config.federation.seed}); "
        "mean and 95% CI over test episodes.",
        "",
        "| algorithm | accuracy | 95% CI | worst decile of sites | MB sent+received | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['algorithm']} | {_fmt(row['accuracy'])} | ± {_fmt(row['ci95'])} | "
                     f"{_fmt(row['worst_decile'])} | {row['bytes'] / 1e6:.1f} | {row['seconds']:.0f} |")
    # Every run starts from the same theta_0 (federation.seed) and is scored on
    # the same episodes (federation.eval_seed): one random-init row, one 1-NN figure.
    if "none" not in algorithms and rows:
        lines.append(f"| none (random initialization, adapted the same way) | {_fmt(rows[0]['random_init'])} | "
                     f"± {_fmt(rows[0]['random_init_ci95'])} | | 0.0 | 0 |")
    lines += ["", f"1-NN on the raw inputs of the same test episodes (no learning): {_fmt(rows[0]['raw_1nn'])}."]
    from simulations.experiment_plots import plot_comparison

    return _write_results(out, stem="compare", lines=lines, rows=rows, plot=plot_comparison)


# ----------------------------------------------------------- privacy sweep
# Record-level noise is planned for the number of rounds a site takes part in
# with this probability, not for the mean: planned for the mean, about half of
# the sites are sampled more often than planned and run out of budget before
# the last round (30 rounds at 10 of 100 sites: 35% of sites are sampled more
# than 3 times), which drops them from the late rounds of the experiment.
PARTICIPATION_COVERAGE = 0.9


def site_sample_rate(config: Config, num_sites: int) -> float:
    """The chance that a given site is sampled in a round (count or fraction sampling alike)."""
    fed = config.federation
    return fed.fraction if fed.fraction > 0 else min(1.0, fed.sites_per_round / max(num_sites, 1))


def expected_participations(config: Config, num_sites: int) -> float:
    return config.federation.rounds * site_sample_rate(config, num_sites)


def planned_participations(config: Config, num_sites: int, *, coverage: float = PARTICIPATION_COVERAGE) -> int:
    """Rounds a site takes part in with probability ``coverage``.

    Each round samples every site with the same chance ``r`` independently of
    earlier rounds (a uniform draw of ``k`` of ``n`` sites, or Poisson sampling
    at ``r``), so a site's participations are Binomial(rounds, r); this is its
    ``coverage`` quantile.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1]; got {coverage}")
    rounds, rate = config.federation.rounds, site_sample_rate(config, num_sites)
    if coverage >= 1.0:
        return rounds
    cdf = 0.0
    for m in range(rounds + 1):
        cdf += math.comb(rounds, m) * rate**m * (1.0 - rate) ** (rounds - m)
        if cdf >= coverage - 1e-12:
            return m
    return rounds


def plan(config: Config, *, level: str, target_epsilon: float, num_sites: int) -> tuple[float, str]:
    """Noise multiplier that reaches ``target_epsilon`` at the config's delta, and a readable summary."""
    from common.privacy.planner import format_plan, plan_client_noise, plan_noise_multiplier
    from common.privacy.planner import participations as count_participations

    if level == "record":
        from common.algorithms import get_algorithm
        from common.privacy.accounting import record_level_round_steps

        dp = config.privacy.record
        participations = planned_participations(config, num_sites)
        # FOMAML and Meta-SGD also release a noised query gradient per episode
        # (its own Poisson sample at the same rate): sigma must cover both releases.
        query = get_algorithm(config.algorithm.name).uses_query_gradient
        k = max(1, config.algorithm.inner_steps)
        sigma = plan_noise_multiplier(
            target_epsilon=target_epsilon, delta=dp.delta,
            episodes_per_round=config.episodes.episodes_per_round, inner_steps=k,
            sample_rate=dp.sample_rate, expected_participations=participations, accountant=dp.accountant,
            query_release=query, query_sample_rate=dp.sample_rate,
        )
        steps = record_level_round_steps(
            episodes=count_participations(expected_participations=participations)
            * config.episodes.episodes_per_round, inner_steps=k,
            noise_multiplier=sigma, sample_rate=dp.sample_rate,
            query_release=query, query_sample_rate=dp.sample_rate,
        )
        text = format_plan(level="record", accountant=dp.accountant, delta=dp.delta, noise_multiplier=sigma,
                           clip_norm=dp.clip_norm, sample_rate=dp.sample_rate, steps=steps,
                           target_epsilon=target_epsilon, inner_steps=config.algorithm.inner_steps,
                           query_release=query)
        text += (f"\n  planned for {participations} rounds per site: a site is sampled that often or less "
                 f"with probability {PARTICIPATION_COVERAGE:g} "
                 f"({expected_participations(config, num_sites):.3g} on average)")
        return sigma, text
    if level == "client":
        dp = config.privacy.client
        q = config.federation.fraction
        if q <= 0:
            raise ConfigError("client-level DP needs federation.fraction (the Poisson rate of sites per round)")
        sigma = plan_client_noise(target_epsilon=target_epsilon, delta=dp.delta, rounds=config.federation.rounds,
                                  sample_rate=q, accountant=dp.accountant)
        text = format_plan(level="client", accountant=dp.accountant, delta=dp.delta, noise_multiplier=sigma,
                           clip_norm=dp.clip_norm, sample_rate=q, steps=[(sigma, q, config.federation.rounds)],
                           target_epsilon=target_epsilon)
        return sigma, text
    raise ConfigError(f"privacy level must be 'record' or 'client'; got {level!r}")


def private_config(config: Config, *, level: str, target_epsilon: float, num_sites: int, ledger_dir: Path) -> Config:
    def with_sigma(sigma: float) -> Config:
        if level == "record":
            record = dataclasses.replace(
                config.privacy.record, enabled=True, noise_multiplier=sigma, target_epsilon=target_epsilon,
                # A site that would pass the target (it was sampled more often than
                # expected) refuses: no site ends above the epsilon reported.
                max_epsilon=target_epsilon,
            )
            privacy = dataclasses.replace(config.privacy, record=record)
            # The sweep plays every site: each target keeps its own ledgers.
            site_privacy = dataclasses.replace(config.site_privacy, ledger_dir=str(ledger_dir))
            return dataclasses.replace(config, privacy=privacy, site_privacy=site_privacy)
        else:
            client = dataclasses.replace(config.privacy.client, enabled=True, noise_multiplier=sigma,
                                         target_epsilon=target_epsilon)
            privacy = dataclasses.replace(config.privacy, client=client)
        return dataclasses.replace(config, privacy=privacy)

    # Checked like a loaded config before planning: e.g. second-order MAML is
    # refused under record-level DP.
    validate(with_sigma(0.0))
    sigma, text = plan(config, level=level, target_epsilon=target_epsilon, num_sites=num_sites)
    print(text, flush=True)
    return with_sigma(sigma)


def _site_epsilons(ledger_dir: Path) -> dict[str, float]:
    out = {}
    for path in sorted(ledger_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        entries = doc.get("entries") or []
        out[path.stem] = float(entries[-1]["epsilon"]) if entries else 0.0
    return out


def _check_site_policy(config: Config) -> None:
    """What ``metafed simulate`` checks before Ray starts: every simulated site's policy accepts the request."""
    from client import privacy_policy

    privacy_policy.check(config, privacy_policy.validate(config.site_privacy))


def privacy_sweep(
    config: Config,
    *,
    epsilons: tuple[float, ...] = (math.inf, 8.0, 4.0, 2.0, 1.0),
    levels: tuple[str, ...] = ("record", "client"),
) -> Path:
    """Held-out accuracy against epsilon for each privacy level; table, plot, every site's epsilon."""
    from client.sites import train_site_dirs
    from simulations.runner import absolute_paths, prepare_data

    config = absolute_paths(config)
    num_sites = len(prepare_data(config)) or len(train_site_dirs(config.data.root))
    out = Path(config.output_dir) / f"{config.name}-privacy-{_timestamp()}"
    base = dataclasses.replace(config, privacy=dataclasses.replace(
        config.privacy, record=dataclasses.replace(config.privacy.record, enabled=False),
        client=dataclasses.replace(config.privacy.client, enabled=False)))
    # Every private config is built, planned and checked (the config's rules, the
    # simulated sites' policy) before the first run: a level that cannot run is
    # bad input, found before anything expensive starts.
    private: list[tuple[str, float, Config, Path]] = []
    for level in levels:
        for target in (e for e in epsilons if not math.isinf(e)):
            cfg = base
            if level == "client" and not cfg.federation.poisson:
                # Amplification by sampling holds only for Poisson sampling of sites.
                fraction = cfg.federation.fraction or cfg.federation.sites_per_round / num_sites
                cfg = dataclasses.replace(cfg, federation=dataclasses.replace(
                    cfg.federation, poisson=True, fraction=fraction))
            ledger_dir = out / "ledgers" / f"{level}-eps{target:g}"
            cfg = private_config(cfg, level=level, target_epsilon=target, num_sites=num_sites, ledger_dir=ledger_dir)
            _check_site_policy(cfg)
            private.append((level, target, cfg, ledger_dir))
    rows: list[dict[str, Any]] = []
    if any(math.isinf(e) for e in epsilons):
        run_dir = run_one(base, name="non-private", output_dir=out / "runs")
        final = final_meta_test(run_dir)
        rows.append({"level": "none", "target_epsilon": math.inf, "epsilon": math.inf, "noise_multiplier": 0.0,
                     "accuracy": final["accuracy"], "ci95": final["ci95"], "run_dir": str(run_dir),
                     "status": "completed"})
    for level, target, cfg, ledger_dir in private:
        run_dir = run_one(cfg, name=f"{level}-eps{target:g}", output_dir=out / "runs", keep_failed=True)
        final = final_meta_test(run_dir)
        status, reason = run_status(run_dir)
        row: dict[str, Any] = {"level": level, "target_epsilon": target, "accuracy": final["accuracy"],
                               "ci95": final["ci95"], "run_dir": str(run_dir), "status": status,
                               **({"reason": reason} if reason else {})}
        if level == "record":
            sites = _site_epsilons(ledger_dir)
            row.update(noise_multiplier=cfg.privacy.record.noise_multiplier,
                       epsilon=max(sites.values(), default=0.0),
                       median_site_epsilon=statistics.median(sites.values()) if sites else 0.0,
                       site_epsilons=sites)
        else:
            eps = [r["privacy"]["client_epsilon"] for r in read_metrics(run_dir) if r.get("privacy")]
            row.update(noise_multiplier=cfg.privacy.client.noise_multiplier, epsilon=eps[-1] if eps else math.nan)
        rows.append(row)
    delta_r, delta_c = config.privacy.record.delta, config.privacy.client.delta
    lines = [
        f"Held-out accuracy against epsilon ({config.federation.rounds} rounds, seed {config.federation.seed}; "
        f"record-level delta={delta_r:g}, client-level delta={delta_c:g}). Record level: epsilon is the "
        "largest over sites (each site's ledger); client level: the global model's. Record-level noise is "
        f"planned for {planned_participations(config, num_sites)} participations per site (a site is sampled "
        f"that often or less with probability {PARTICIPATION_COVERAGE:g}; {expected_participations(config, num_sites):g} "
        "on average); a site sampled more often refuses once the next round would pass the target.",
        "",
        "| level | target epsilon | epsilon reached | noise multiplier | accuracy | 95% CI | run |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['level']} | {_fmt(row['target_epsilon'], 1)} | {_fmt(row['epsilon'], 2)} | "
                     f"{_fmt(row['noise_multiplier'], 3)} | {_fmt(row['accuracy'])} | ± {_fmt(row['ci95'])} | "
                     f"{row['status']} |")
    failed = [row for row in rows if row["status"] != "completed"]
    if failed:
        lines += ["", "Failed runs (accuracy: their last meta-test):"]
        lines += [f"- {row['level']} epsilon {_fmt(row['target_epsilon'], 1)}: {row.get('reason', '')}" for row in failed]
    from simulations.experiment_plots import plot_privacy_sweep

    written = _write_results(out, stem="privacy_sweep", lines=lines, rows=rows, plot=plot_privacy_sweep)
    if failed:
        raise SomeRunsFailed(f"{len(failed)} of {len(rows)} runs ended as failed (see the table in {written})")
    return written


def _write_results(out: Path, *, stem: str, lines: list[str], rows: list[dict[str, Any]], plot) -> Path:
    """An experiment's table (``stem.md``), its rows (``stem.json``) and its plot, all in ``out``."""
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2, default=str))
    plot(rows, out)
    print("\n".join(lines))
    print(f"written: {out}")
    return out
