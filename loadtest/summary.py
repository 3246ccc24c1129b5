"""What a load test run measured, its pass/fail criteria and its human-readable report."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from loadtest.clients import Outcome
from loadtest.request_mix import KINDS


@dataclass
class Summary:
    """Everything a run measured, and its criteria; ``to_json`` is what ``--json`` writes.

    rss: bytes (NaN where not measured); cpu: seconds, forward passes and images per pass.
    """

    config: dict[str, Any]
    machine: dict[str, Any]
    seconds: float
    statuses: dict[str, int]
    kinds: dict[str, dict[str, Any]]
    valid: dict[str, Any]
    invalid: dict[str, Any]
    rss: dict[str, float]
    cpu: dict[str, float]
    criteria: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether every criterion passed."""
        return all(c["passed"] for c in self.criteria.values())

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON-ready values, with ``passed``."""
        return {**asdict(self), "passed": self.passed}


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max in milliseconds (NaN if empty)."""
    if not seconds:
        return {k: float("nan") for k in ("p50", "p95", "p99", "max")}
    a = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(outcomes: Sequence[Outcome], seconds: float, config: dict[str, Any],
              machine: dict[str, Any], rss: dict[str, float], cpu: dict[str, float],
              max_rss_growth: float, alive: bool) -> Summary:
    """Counts, latencies and the pass/fail criteria of a run."""
    statuses = Counter(str(o.status) for o in outcomes)
    kinds: dict[str, dict[str, Any]] = {}
    for i, k in enumerate(KINDS):
        mine = [o for o in outcomes if o.kind == i]
        if not mine:
            continue
        expected = [o for o in mine if o.status == k.status and o.code == k.code]
        kinds[k.name] = {"valid": k.valid, "count": len(mine), "expected_status": k.status,
                         "expected": f"{k.status} {k.code or ''}".strip(),
                         "as_expected": len(expected),
                         "statuses": dict(Counter(str(o.status) for o in mine)),
                         "latency_ms": percentiles_ms([o.seconds for o in mine])}
    valid = [o for o in outcomes if KINDS[o.kind].valid]
    invalid = [o for o in outcomes if not KINDS[o.kind].valid]
    labelled = sum(o.images for o in valid)
    valid_failed = [o for o in valid if o.status != 200]
    unexpected = [o for o in invalid
                  if (o.status, o.code) != (KINDS[o.kind].status, KINDS[o.kind].code)]
    server_errors = [o for o in outcomes if o.status >= 500]
    transport = [o for o in outcomes if o.status == 0]
    growth = rss["after_run"] / rss["after_warmup"] - 1.0  # NaN where RSS was not measured
    summary = Summary(
        config=config, machine=machine, seconds=seconds, statuses=dict(statuses), kinds=kinds,
        valid={"count": len(valid), "failed": len(valid_failed),
               "overloaded_503": sum(o.status == 503 for o in valid),
               "throughput_rps": len(valid) / seconds,
               "latency_ms": percentiles_ms([o.seconds for o in valid if o.status == 200]),
               "images_labelled": labelled,
               "accuracy": sum(o.correct for o in valid) / labelled if labelled else None},
        invalid={"count": len(invalid), "unexpected": len(unexpected),
                 "unexpected_examples": [f"{KINDS[o.kind].name}: {o.status} {o.code}"
                                         for o in unexpected[:10]],
                 "latency_ms": percentiles_ms([o.seconds for o in invalid])},
        rss={**rss, "growth": growth}, cpu=cpu)
    summary.criteria = {
        "valid requests all 200": {"value": len(valid_failed), "passed": not valid_failed},
        "no 5xx": {"value": len(server_errors), "passed": not server_errors},
        "no transport errors": {"value": len(transport), "passed": not transport},
        "invalid requests get their 4xx": {"value": len(unexpected), "passed": not unexpected},
        f"RSS growth within {max_rss_growth:.0%}": {
            "value": round(growth, 4), "passed": abs(growth) <= max_rss_growth},
        "server still running": {"value": alive, "passed": alive},
    }
    if math.isnan(growth):  # an external server without --pid
        del summary.criteria[f"RSS growth within {max_rss_growth:.0%}"]
    return summary


def report(s: Summary) -> str:
    """The human-readable summary of a run."""
    c, v, inv = s.config, s.valid, s.invalid
    mib = 2.0 ** 20
    total = sum(k["count"] for k in s.kinds.values())
    lines = [
        f"{c['bundle']} ({c['model']}{', at ' + c['url'] if c.get('url') else ''}): "
        f"{total} requests at concurrency {c['concurrency']} "
        f"in {s.seconds:.1f} s = {total / s.seconds:.0f} req/s "
        f"({v['count']} valid = {v['throughput_rps']:.0f} req/s, {inv['count']} invalid)",
        f"machine: {s.machine['cpus']} CPUs, load average {s.machine['load_before'][0]:.1f} "
        f"before / {s.machine['load_after'][0]:.1f} after; this process nice "
        f"{s.machine['nice']}; server CPU {s.cpu['server_s']:.1f} s, client CPU "
        f"{s.cpu['client_s']:.1f} s; {s.cpu['images_per_pass']:.1f} images per forward pass",
        "statuses: " + ", ".join(f"{k}: {n}" for k, n in sorted(s.statuses.items())),
        "",
        f"{'kind':<22}{'count':>7}{'expected':>24}{'as exp.':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}  other statuses",
    ]
    for name, k in s.kinds.items():
        lat = k["latency_ms"]
        others = {st: n for st, n in k["statuses"].items() if st != str(k["expected_status"])}
        lines.append(f"{name:<22}{k['count']:>7}{k['expected']:>24}{k['as_expected']:>9}"
                     f"{lat['p50']:>9.1f}{lat['p95']:>9.1f}{lat['p99']:>9.1f}  "
                     f"{others or ''}")
    lat = v["latency_ms"]
    accuracy = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
    rss = (f"RSS: {s.rss['after_start'] / mib:.1f} MiB after start, "
           f"{s.rss['after_warmup'] / mib:.1f} MiB after warm-up, {s.rss['peak'] / mib:.1f} MiB "
           f"peak, {s.rss['after_run'] / mib:.1f} MiB after the run ({s.rss['growth']:+.1%})"
           if not math.isnan(s.rss["growth"]) else "RSS: not measured (--url without --pid)")
    lines += [
        "",
        f"valid: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"max {lat['max']:.1f} ms; failed {v['failed']} (503 overloaded: "
        f"{v['overloaded_503']}); accuracy {accuracy} on {v['images_labelled']} images",
        rss,
    ]
    if inv["unexpected_examples"]:
        lines.append("unexpected answers to invalid requests: "
                     + "; ".join(inv["unexpected_examples"]))
    lines.append("")
    for name, crit in s.criteria.items():
        lines.append(f"  [{'PASS' if crit['passed'] else 'FAIL'}] {name} ({crit['value']})")
    lines.append(f"load test {'PASSED' if s.passed else 'FAILED'}")
    return "\n".join(lines)
