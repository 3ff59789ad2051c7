"""The soak's result: every recorded answer judged, the invariants checked, and the plot.

Checks (each ``{"value", "target", "ok"}``; the run passes when all hold):

* ``wrong_adapter_answers``: 0 -- see ``bench.soak_checks.judge``.
* ``well_formed_failures_outside_window``: 0 -- a well-formed call (a tenant's predict, a
  probe, promote/rollback, job calls) answered 5xx or not at all, outside the fault window.
  The window opens when the worker is SIGKILLed and closes ``WINDOW_GRACE_S`` after the
  respawned worker's first 200; inside it only 503 (the new worker loading its model) and
  dropped connections (requests in flight on the killed worker) are allowed; a 500 never is.
* ``well_formed_unexpected_4xx``: 0 -- 4xx other than 429 for a well-formed call.
* ``hostile_5xx_outside_window``: 0 -- each hostile request deserves a 4xx; a 5xx or a dropped
  connection fails.
* ``rss_growth_after_warmup``: < 5% -- median RSS of the process tree over the last tenth of
  the run against the median over the tenth after warm-up; and the same for the processes
  alive in both (``rss_growth_of_surviving_processes``: the killed worker's successor starts
  cold, which hides a leak in the tree's sum), and for each serving worker alive in both
  (``rss_growth_of_each_serving_worker``, the largest: a sum dilutes one worker's growth).
* ``stuck_jobs``: 0 -- every submitted job reached a terminal state (``job_grace`` after the run);
  ``job_submit_to_running_max_s`` <= 120 s: no tenant's small job waits long behind others'.
* ``promotion_served_max_s``: <= 1 s -- from each change's response to the first answer, to a
  request sent after that response, from the new version; a change never served counts as inf.
  It includes that request's own latency; ``promotions`` also reports when that request was
  sent (``served_request_sent_s``) and the last request sent after the change that still got
  the old version (``stale_request_sent_s``: the switch came later than that), which bound
  the switch itself from both sides.
* ``worker_respawned``: the killed worker came back (a new pid answered 200).
* ``processes_left_behind``: 0 -- no process of the server's tree (a training worker orphaned
  by the killed serving worker, say) outlived ``bentoml serve``'s SIGTERM; any are killed.
* and non-vacuity: answers judged, every tenant answered, hostile requests sent, changes made,
  a job succeeded.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.common import percentile, save_figure
from bench.soak_checks import ADAPTER, Answer, Timeline, in_window, judge
from bench.soak_load import PROBE_DEADLINE_S, TERMINAL, Plan, Recorder
from bench.soak_tenants import Tenant

WINDOW_GRACE_S = 1.0
RSS_LIMIT = 0.05
PROMOTION_LIMIT_S = 1.0
JOB_START_LIMIT_S = 120.0  # issue 11: a small job starts within 2 minutes in the soak
BIN_S = 2.0
MAX_EXAMPLES = 20


def fault_window(rec: Recorder, end: float) -> tuple[tuple[float, float] | None, float | None]:
    """(the window, seconds from the kill to the respawned worker's first 200)."""
    if not rec.kill:
        return None, None
    t_kill, before = rec.kill["t"], set(rec.kill["workers_before"])
    back = [a.received for a in rec.answers if a.status == 200 and a.worker and a.worker not in before
            and a.received > t_kill]
    if not back:
        return (t_kill, end), None
    return (t_kill, min(back) + WINDOW_GRACE_S), min(back) - t_kill


def summarise(rec: Recorder, plan: Plan, timeline: Timeline, tenants: list[Tenant], finished: float,
              orphans: list[int], left_behind: list[int]) -> dict[str, Any]:
    t0 = rec.start
    warm_end = t0 + plan.warmup
    window, respawn_s = fault_window(rec, finished)

    def rel(t: float) -> float:
        return round(t - t0, 3)

    n_labels = {(t.name, v): n for t in tenants for v, n in t.n_labels.items()}
    wrong: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    unexpected_4xx: list[dict[str, Any]] = []
    allowed_in_window: Counter[str] = Counter()
    rate_limited = stale = ok_answers = 0
    per_tenant: Counter[str] = Counter()

    def failure(what: str, sent: float, received: float, status: int, worker: str, detail: str) -> None:
        item = {"what": what, "sent_s": rel(sent), "received_s": rel(received), "status": status,
                "worker": worker, "detail": detail[:300]}
        if status in (0, 503) and in_window(sent, received, window):
            allowed_in_window[str(status)] += 1
        elif status == 0 or status >= 500:
            failures.append(item)
        elif status == 429:
            nonlocal rate_limited
            rate_limited += 1
        else:
            unexpected_4xx.append(item)

    for a in rec.answers:
        if a.status == 200:
            v = judge(a, timeline, n_labels)
            if not v.ok:
                wrong.append({"source": a.source, "tenant": a.tenant, "ref": a.ref, "sent_s": rel(a.sent),
                              "received_s": rel(a.received), "worker": a.worker, "version": v.version,
                              "reason": v.reason})
            else:
                ok_answers += 1
                stale += v.stale
                per_tenant[a.tenant] += 1
        else:
            failure(f"predict {a.source} {a.ref}", a.sent, a.received, a.status, a.worker,
                    a.body.decode(errors="replace"))
    for c in rec.calls:
        if c.status not in (200, 201):
            failure(c.what, c.sent, c.received, c.status, "", c.detail)

    hostile_by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    hostile_bad: list[dict[str, Any]] = []
    for kind, sent, received, status in rec.hostile:
        hostile_by_kind[kind][str(status)] += 1
        if (status == 0 or status >= 500) and not in_window(sent, received, window):
            hostile_bad.append({"kind": kind, "sent_s": rel(sent), "status": status})

    t503 = [a.received for a in rec.answers if a.status == 503]
    latency = latency_summary([a for a in rec.answers if a.source == "load"], warm_end, window)
    rss = rss_summary(rec, warm_end)
    worker_growth = max(rss.get("serving_worker_growth", {}).values(), default=None)
    promotions = promotion_summary(rec, timeline, rel, plan.workers)
    jobs = job_summary(rec, rel)
    served = [p["served_s"] for p in promotions["changes"]]
    served_max = max((math.inf if s is None else s for s in served), default=math.inf)

    checks = {
        "wrong_adapter_answers": check(len(wrong), "== 0", len(wrong) == 0),
        "well_formed_failures_outside_window": check(len(failures), "== 0", not failures),
        "well_formed_unexpected_4xx": check(len(unexpected_4xx), "== 0", not unexpected_4xx),
        "hostile_5xx_outside_window": check(len(hostile_bad), "== 0", not hostile_bad),
        "rss_growth_after_warmup": check(rss.get("growth"), f"< {RSS_LIMIT}",
                                         rss.get("growth") is not None and rss["growth"] < RSS_LIMIT),
        "rss_growth_of_surviving_processes": check(
            rss.get("survivors_growth"), f"< {RSS_LIMIT}",
            rss.get("survivors_growth") is not None and rss["survivors_growth"] < RSS_LIMIT),
        "rss_growth_of_each_serving_worker": check(
            worker_growth, f"< {RSS_LIMIT}", worker_growth is not None and worker_growth < RSS_LIMIT),
        "stuck_jobs": check(jobs["stuck"], "== 0", jobs["stuck"] == 0),
        "promotion_served_max_s": check(None if math.isinf(served_max) else served_max,
                                        f"<= {PROMOTION_LIMIT_S}", served_max <= PROMOTION_LIMIT_S),
        "answers_judged": check(ok_answers + len(wrong), "> 0", ok_answers + len(wrong) > 0),
        "tenants_answered": check(len(per_tenant), f"== {len(tenants)}", len(per_tenant) == len(tenants)),
        "hostile_requests": check(len(rec.hostile), "> 0", len(rec.hostile) > 0),
        "changes": check(len(promotions["changes"]), ">= 1", len(promotions["changes"]) >= 1),
        "jobs_succeeded": check(jobs["by_status"].get("succeeded", 0), ">= 1",
                                jobs["by_status"].get("succeeded", 0) >= 1),
    }
    wait = jobs["submit_to_running_max_s"]
    checks["job_submit_to_running_max_s"] = check(wait, f"<= {JOB_START_LIMIT_S:.0f}",
                                                  wait is not None and wait <= JOB_START_LIMIT_S)
    left = len(left_behind)
    checks["processes_left_behind"] = check(left, "== 0", left == 0)
    if plan.kill_at is not None:
        checks["worker_respawned"] = check(respawn_s, "a new worker answers", respawn_s is not None)
    return {
        "ok": all(c["ok"] for c in checks.values()),
        "ran_s": round(rec.end - rec.start, 1),
        "checks": checks,
        "answers": {"ok": ok_answers, "stale_within_1s": stale, "wrong": len(wrong),
                    "rate_limited_429": rate_limited, "allowed_in_fault_window": dict(allowed_in_window),
                    "per_tenant_min": min(per_tenant.values(), default=0),
                    "per_tenant_median": statistics.median(per_tenant.values()) if per_tenant else 0},
        "latency": latency,
        "rss": rss,
        "promotions": promotions,
        "jobs": jobs,
        "kill": {**{k: v for k, v in rec.kill.items() if k != "t"}, "at_s": rel(rec.kill["t"]) if rec.kill else None,
                 "answered_503_from_s": rel(min(t503)) if t503 else None,
                 "answered_503_until_s": rel(max(t503)) if t503 else None,
                 "respawn_s": respawn_s, "window_s": [rel(window[0]), rel(window[1])] if window else None,
                 "orphaned_processes_after_run": orphans, "left_behind_after_stop": left_behind},
        "hostile": {"requests": len(rec.hostile), "by_kind": {k: dict(v) for k, v in sorted(hostile_by_kind.items())},
                    "requests_per_s": len(rec.hostile) / (rec.end - rec.start)},
        "examples": {"wrong": wrong[:MAX_EXAMPLES], "failures": failures[:MAX_EXAMPLES],
                     "unexpected_4xx": unexpected_4xx[:MAX_EXAMPLES], "hostile": hostile_bad[:MAX_EXAMPLES]},
        "notes": rec.notes,
    }


def check(value: Any, target: str, ok: bool) -> dict[str, Any]:
    return {"value": value, "target": target, "ok": bool(ok)}


def latency_summary(answers: list[Answer], warm_end: float, window: tuple[float, float] | None) -> dict[str, Any]:
    """The well-behaved tenants' predict latency after warm-up, overall and per time bin."""
    ok = [a for a in answers if a.status == 200 and a.sent >= warm_end]
    ms = [(a.received - a.sent) * 1e3 for a in ok]
    outside = [(a.received - a.sent) * 1e3 for a in ok if not in_window(a.sent, a.received, window)]
    start = min((a.sent for a in answers), default=warm_end)
    bins: dict[int, list[float]] = defaultdict(list)
    for a in answers:
        if a.status == 200:
            bins[int((a.sent - start) // BIN_S)].append((a.received - a.sent) * 1e3)
    duration = max((a.received for a in ok), default=warm_end) - warm_end
    return {
        "requests": len(ms), "requests_per_s": len(ms) / duration if duration > 0 else 0.0,
        "p50_ms": percentile(ms, 0.5), "p95_ms": percentile(ms, 0.95), "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms, default=float("nan")),
        "p99_ms_outside_fault_window": percentile(outside, 0.99),
        "series": {"bin_s": BIN_S, "t_s": [round(b * BIN_S, 1) for b in sorted(bins)],
                   "p50_ms": [round(percentile(bins[b], 0.5), 2) for b in sorted(bins)],
                   "p99_ms": [round(percentile(bins[b], 0.99), 2) for b in sorted(bins)],
                   "requests": [len(bins[b]) for b in sorted(bins)]},
    }


def rss_summary(rec: Recorder, warm_end: float) -> dict[str, Any]:
    after = [s for s in rec.rss if s.t >= warm_end]
    out: dict[str, Any] = {"samples": len(rec.rss), "series": {
        "t_s": [round(s.t - rec.start, 2) for s in rec.rss], "total_mb": [round(s.total / 2**20, 1) for s in rec.rss],
        "serving_mb": [round(s.serving / 2**20, 1) for s in rec.rss], "processes": [s.processes for s in rec.rss],
        "load_average": [round(s.load_average, 2) for s in rec.rss]}}
    if rec.rss:
        out["load_average_mean"] = round(statistics.mean(s.load_average for s in rec.rss), 2)
    if len(after) < 6:
        return {**out, "growth": None}
    k = max(3, len(after) // 10)
    for name in ("total", "serving"):
        first = statistics.median(getattr(s, name) for s in after[:k])
        last = statistics.median(getattr(s, name) for s in after[-k:])
        out[f"{name}_after_warmup_mb"] = round(first / 2**20, 1)
        out[f"{name}_at_end_mb"] = round(last / 2**20, 1)
        out[f"{name}_growth"] = round(last / first - 1, 4)
    # the processes that lived through both windows (not the killed worker or its successor)
    survivors = set.intersection(*(set(s.per_pid) for s in after[:k] + after[-k:]))
    first = statistics.median(sum(s.per_pid[p] for p in survivors) for s in after[:k])
    last = statistics.median(sum(s.per_pid[p] for p in survivors) for s in after[-k:])
    out["survivors"] = len(survivors)
    out["survivors_after_warmup_mb"] = round(first / 2**20, 1)
    out["survivors_growth"] = round(last / first - 1, 4) if first else None
    out["growth"] = out["total_growth"]
    # the trend, beside the two windows: serving processes that lived through the run
    serving = [p for p in survivors if rec.roles.get(p) != "training"]
    ys = [sum(s.per_pid.get(p, 0) for p in serving) / 2**20 for s in after]
    out["serving_survivors_slope_mb_per_min"] = round(60 * _slope([s.t for s in after], ys), 2)
    # each serving worker on its own: a sum over processes can hide one that grows
    out["serving_worker_growth"] = {
        str(p): round(statistics.median(s.per_pid[p] for s in after[-k:])
                      / statistics.median(s.per_pid[p] for s in after[:k]) - 1, 4)
        for p in serving if rec.roles.get(p) == "serving"}
    every = max(1, len(rec.rss) // 120)
    out["per_process"] = {str(pid): {"role": rec.roles.get(pid, "?"),
                                     "t_s": [round(s.t - rec.start, 1) for s in rec.rss[::every] if pid in s.per_pid],
                                     "mb": [round(s.per_pid[pid] / 2**20, 1) for s in rec.rss[::every]
                                            if pid in s.per_pid]}
                          for pid in sorted({p for s in rec.rss for p in s.per_pid})}
    out["max_total_mb"] = round(max(s.total for s in rec.rss) / 2**20, 1)
    out["window_samples"] = k
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def promotion_summary(rec: Recorder, timeline: Timeline, rel: Any, workers: int) -> dict[str, Any]:
    """Per change: time from its response to the first answer from the new version (to a
    request sent after the response), and to every worker having answered it while probed
    (None when some worker did not answer the probes in time: e.g. one was being respawned)."""
    by_tenant: dict[str, list[Answer]] = defaultdict(list)
    for a in rec.answers:
        if a.status == 200 and a.ref == ADAPTER:
            by_tenant[a.tenant].append(a)
    changes = []
    for probe in rec.probes:
        c = probe.change
        later = [x.sent for x in timeline.changes.get(c.tenant, []) if x.sent > c.received]
        until = min(later, default=math.inf)
        firsts: dict[str, float] = {}
        sent_first: float | None = None
        for a in sorted(by_tenant[c.tenant], key=lambda a: a.received):
            if c.received <= a.sent < until and json.loads(a.body).get("version") == c.new:
                firsts.setdefault(a.worker, a.received - c.received)
                sent_first = a.sent - c.received if sent_first is None else min(sent_first, a.sent - c.received)
        served = min(firsts.values(), default=None)
        # the last request sent after the response that still got the old version: the server
        # resolved it no earlier than it was sent, so the switch came later than that
        stale_sent = max((a.sent - c.received for a in by_tenant[c.tenant]
                          if c.received <= a.sent < until and json.loads(a.body).get("version") == c.old),
                         default=None)
        in_probe = [s for s in firsts.values() if s <= PROBE_DEADLINE_S]
        changes.append({"tenant": c.tenant, "kind": c.kind, "at_s": rel(c.received), "old": c.old, "new": c.new,
                        "call_s": round(c.received - c.sent, 4),
                        "served_s": None if served is None else round(served, 4),
                        # when that request was sent: the rest of served_s is its own latency
                        "served_request_sent_s": None if sent_first is None else round(sent_first, 4),
                        "stale_request_sent_s": None if stale_sent is None else round(stale_sent, 4),
                        "every_worker_s": round(max(in_probe), 4) if len(in_probe) >= workers else None,
                        "workers_served": len(firsts)})
    served = [c["served_s"] for c in changes if c["served_s"] is not None]
    every = [c["every_worker_s"] for c in changes if c["every_worker_s"] is not None]
    return {"count": len(changes), "by_kind": dict(Counter(c["kind"] for c in changes)),
            "never_served": sum(c["served_s"] is None for c in changes),
            "served_p50_s": percentile(served, 0.5), "served_max_s": max(served, default=None),
            "served_request_sent_max_s": max((c["served_request_sent_s"] for c in changes
                                              if c["served_request_sent_s"] is not None), default=None),
            # a lower bound of the slowest switch, free of request latency (served_max_s includes it)
            "stale_request_sent_max_s": max((c["stale_request_sent_s"] for c in changes
                                             if c["stale_request_sent_s"] is not None), default=None),
            "every_worker_p50_s": percentile(every, 0.5), "every_worker_max_s": max(every, default=None),
            "changes": changes}


def job_summary(rec: Recorder, rel: Any) -> dict[str, Any]:
    by_status = Counter(j.status for j in rec.jobs)
    stuck = [j for j in rec.jobs if j.status not in TERMINAL and j.status != "refused"]
    # the service's own started_at - created_at where the job ended, else when a poll saw it running
    queued = [j.server_wait_s if j.server_wait_s is not None else j.running_at - j.submitted
              for j in rec.jobs if j.server_wait_s is not None or j.running_at is not None]
    runs = [j.server_run_s for j in rec.jobs if j.server_run_s is not None]
    total = [j.finished_at - j.submitted for j in rec.jobs if j.finished_at is not None]
    return {"submitted": len(rec.jobs), "by_status": dict(by_status), "stuck": len(stuck),
            "submit_to_running_max_s": max(queued, default=None), "submit_to_running_p50_s": percentile(queued, 0.5),
            "submit_to_done_max_s": max(total, default=None), "submit_to_done_p50_s": percentile(total, 0.5),
            "started_to_done_p50_s": percentile(runs, 0.5),
            "jobs": [{"tenant": j.tenant, "id": j.id, "status": j.status, "submitted_s": rel(j.submitted),
                      "running_s": None if j.running_at is None else rel(j.running_at),
                      "done_s": None if j.finished_at is None else rel(j.finished_at),
                      "server_wait_s": j.server_wait_s, "server_run_s": j.server_run_s,
                      "version": j.version, "error": j.error} for j in rec.jobs]}


def plot(png: Path, result: dict[str, Any]) -> None:
    """Latency (p50/p99 per bin), the process tree's RSS, and each process's RSS over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, rss = result["latency"]["series"], result["rss"]["series"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    ax1.plot(lat["t_s"], lat["p50_ms"], label="p50")
    ax1.plot(lat["t_s"], lat["p99_ms"], label="p99")
    ax1.set_yscale("log")
    ax1.set_ylabel(f"predict latency, ms ({lat['bin_s']:.0f} s bins)")
    ax2.plot(rss["t_s"], rss["total_mb"], label="process tree")
    ax2.plot(rss["t_s"], rss["serving_mb"], label="serving processes")
    ax2.set_ylabel("RSS, MB")
    for pid, proc in result["rss"].get("per_process", {}).items():
        ax3.plot(proc["t_s"], proc["mb"], linewidth=1, label=f"{proc['role']} {pid}")
    ax3.set_ylabel("RSS per process, MB")
    ax3.set_xlabel("seconds into the run")
    for ax in (ax1, ax2, ax3):
        ax.axvspan(0, result["config"]["warmup_s"], color="0.85", label="warm-up")
        if result["kill"]["window_s"]:
            ax.axvspan(*result["kill"]["window_s"], color="tab:red", alpha=0.2, label="kill window")
        for c in result["promotions"]["changes"]:
            ax.axvline(c["at_s"], color="tab:green", alpha=0.15, linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    checks = ", ".join(f"{k}={'ok' if v['ok'] else 'FAIL'}" for k, v in result["checks"].items()
                       if k in ("wrong_adapter_answers", "well_formed_failures_outside_window",
                                "rss_growth_after_warmup", "stuck_jobs", "promotion_served_max_s"))
    killed = ", 1 serving worker SIGKILLed" if result["kill"]["at_s"] is not None else ""
    fig.suptitle(f"soak: {result['config']['tenants']} tenants, {result['ran_s']:.0f} s, "
                 f"{result['promotions']['count']} prod changes (green){killed}\n{checks}", fontsize=9)
    save_figure(fig, png)
