"""What `staircase calibrate` and `staircase validate` print: the fit table, the validation table
and its target checks, the phases."""

from __future__ import annotations






def fit_table(fits) -> str:
    lines = ["| engine | model | overhead | prefill a + bP + cP^2 | decode base + per_seq B + per_ctx C | "
             "prefill fit (n, median rel err, R^2) | decode fit (n, median rel err, R^2) | noise prefill / decode |",
             "|---|---|---|---|---|---|---|---|"]
    for e, f in fits.items():
        rp, rd = f.residuals["prefill"], f.residuals["decode"]
        nz = " / ".join(f"{n.dist}" if n.dist else "none" for n in (f.noise["prefill"], f.noise["decode"]))
        lines.append(
            f"| {e} | {f.model} | {f.request_overhead_s * 1e3:.1f} ms | {f.prefill['base'] * 1e3:.1f} ms + "
            f"{f.prefill['per_token'] * 1e6:.1f} us/tok + {f.prefill['per_token2'] * 1e9:.2f} ns/tok^2 + "
            f"{f.prefill.get('per_token_cached', 0.0) * 1e9:.2f} ns/tok x cached | "
            f"{f.decode['base'] * 1e3:.2f} ms + {f.decode['per_seq'] * 1e3:.3f} ms/seq + "
            f"{f.decode['per_context_token'] * 1e6:.4f} us/tok | {rp['points']}, {rp['median_abs_rel_error']:.1%}, "
            f"{rp['r2']:.3f} | {rd['points']}, {rd['median_abs_rel_error']:.1%}, {rd['r2']:.3f} | {nz} |")
    return "\n".join(lines)


def print_validation(table, checks) -> None:
    """The error table (markdown), each run's engine speed, and each target's verdict."""
    from .compare import METRICS, PERCENTILES

    show = table[table["metric"].isin(["ttft_s", "e2e_s", "tpot_s", "output_tokens_per_s"])]
    lines = ["| run | policy | timing | metric | live p50 | sim p50 | err p50 | live p90 | sim p90 | err p90 | "
             "live p99 | sim p99 | err p99 | W1 (rel) |", "|" + "---|" * 14]
    for _, r in show.iterrows():
        cells = [r["run"], r["policy"], r.get("timing", "calibrated"), METRICS[r["metric"]]]
        for q in PERCENTILES:
            cells += [f"{r[f'live_p{q}']:.3g}", f"{r[f'sim_p{q}']:.3g}", f"{r[f'rel_err_p{q}']:+.1%}"]
        cells.append(f"{r['wasserstein']:.3g} ({r['wasserstein_rel']:.1%})")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print_phases(table)
    print()
    speeds = table.groupby("run", sort=False)[["prefill_time_ratio", "decode_time_ratio"]].first()
    for run, r in speeds.iterrows():
        parts = [f"{phase} at {r[k]:.2f} x" for phase, k in (("prefilled", "prefill_time_ratio"),
                                                             ("decoded", "decode_time_ratio")) if r[k] == r[k]]
        if parts:
            print(f"engine speed: {run} {' and '.join(parts)} the profile's time")
    for _, c in checks.iterrows():
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['run']}  {c['policy']} ({c['timing']}): {c['target']} "
              f"({c['rel_err']:+.1%})")


def print_phases(table) -> None:
    """Where the error comes from: each phase's p50, live vs simulated, per run and policy."""
    from .compare import PHASES

    show = table[table["metric"].isin(list(PHASES))]
    if show.empty:
        return
    print("\nphases (p50, live -> sim, error):")
    for (run, policy), g in show.groupby(["run", "policy"], sort=False):
        cells = [f"{r['metric'].removesuffix('_s')} {r['live_p50']:.3g} -> {r['sim_p50']:.3g} ({r['rel_err_p50']:+.0%})"
                 for _, r in g.iterrows() if r["live_n"]]
        print(f"  {run}  {policy}: " + "; ".join(cells))
    for phase, what in PHASES.items():
        print(f"  {phase.removesuffix('_s')}: {what}")


