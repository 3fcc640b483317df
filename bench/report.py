"""Turn the load generator's JSON lines into ``results.md`` and ``fanout.png``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]
SERVERS = ("squall", "squall-sse", "squall-tcp", "squall-base", "squall-redis",
           "squall-redis-apart", "squall-cluster", "baseline", "nchan", "squall-logged",
           "tornado-minimal")
# (server, reference) pairs compared in a ratio row of their own, above 1.00x favouring
# the first: Squall's SSE and TCP transports against its WebSocket, the WebSocket against
# the base commit, the Redis broker against the memory broker, and the cluster broker
# against the Redis broker
OWN_RATIOS = (("squall-sse", "squall"), ("squall-tcp", "squall"), ("squall", "squall-base"),
              ("squall-redis", "squall"), ("squall-cluster", "squall-redis"))
# (server, reference, target ratio) of deliveries/s at the one N both were measured at
FANOUT_TARGETS = (("squall-cluster", "squall-redis", 0.8),)
REFERENCES = ("baseline", "nchan")
SATURATED = 0.9  # load generator CPU (cores) above which a max-rate cell is a lower bound


def best_max_rate(results: Iterable[Result]) -> dict[tuple[str, int], Result]:
    """The best ``fanout_max`` run per (server, N)."""
    best: dict[tuple[str, int], Result] = {}
    for result in results:
        if result.get("measure") != "fanout_max":
            continue
        key = (result["target"], result["n"])
        if key not in best or result["deliveries_per_s"] > best[key]["deliveries_per_s"]:
            best[key] = result
    return best


def keyed(results: Iterable[Result], measure: str, field: str) -> dict[tuple[str, Any], Result]:
    return {(r["target"], r[field]): r for r in results if r.get("measure") == measure}


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    return f"{value / 1e3:.1f}k/s" if value >= 1e3 else f"{value:.0f}/s"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def detail_rows(
    servers: Sequence[str],
    sizes: Sequence[int],
    found: dict[tuple[str, Any], Result],
    columns: Sequence[tuple[str, int]],
) -> list[list[str]]:
    """One row per (server, N) measured: the given result fields, formatted."""
    return [
        [s, str(n), *(number(r[key], digits) for key, digits in columns)]
        for s in servers
        for n in sizes
        if (r := found.get((s, n))) is not None
    ]


def servers_in(results: Iterable[Result]) -> list[str]:
    present = {r["target"] for r in results}
    return [s for s in SERVERS if s in present]


def ratio_rows(
    servers: Sequence[str],
    columns: Sequence[Any],
    value: Callable[[str, Any], float | None],
    invert: bool = False,
) -> list[list[str]]:
    """Ratio rows against each reference present, oriented so above 1.00x favours Squall.

    Higher-is-better values give squall / reference; with ``invert`` (lower is better:
    latency, memory) reference / squall.
    """
    rows = []
    for reference in (r for r in REFERENCES if r in servers and "squall" in servers):
        cells = []
        for column in columns:
            ours, theirs = value("squall", column), value(reference, column)
            cells.append(ratio(theirs, ours) if invert else ratio(ours, theirs))
        label = f"{reference} / squall" if invert else f"squall / {reference}"
        rows.append([f"*{label}*", *cells])
    for server, reference in OWN_RATIOS:
        if server not in servers or reference not in servers:
            continue
        cells = []
        for column in columns:
            ours, theirs = value(server, column), value(reference, column)
            cells.append(ratio(theirs, ours) if invert else ratio(ours, theirs))
        label = f"{reference} / {server}" if invert else f"{server} / {reference}"
        rows.append([f"*{label}*", *cells])
    return rows


def fanout_section(results: list[Result], sizes: Sequence[int], repeat: int) -> list[str]:
    best = best_max_rate(results)
    servers = [s for s in servers_in(results) if any((s, n) in best for n in sizes)]

    def deliveries(server: str, n: int) -> float | None:
        result = best.get((server, n))
        return result["deliveries_per_s"] if result else None

    def cell(server: str, n: int) -> str:
        result = best.get((server, n))
        busy = result is not None and (result["loadgen_cpu_util"] or 0) >= SATURATED
        return rate(deliveries(server, n)) + (" †" if busy else "")

    lines = [f"## Fan-out: deliveries/s at max publish rate (best of {repeat})", ""]
    header = ["server", *(f"N={n}" for n in sizes)]
    rows = [[s, *(cell(s, n) for n in sizes)] for s in servers]
    lines += table(header, rows + ratio_rows(servers, sizes, deliveries))
    lines += [
        "",
        f"† the load generator used {SATURATED:.2f} of its core or more: it may have been"
        " the limit, and the server may be faster than shown.",
    ]
    for server, reference, wanted in FANOUT_TARGETS:
        for n in sizes:
            ours, theirs = deliveries(server, n), deliveries(reference, n)
            if ours and theirs:
                found = ours / theirs
                lines += ["", f"Target: {server} / {reference} at N={n}: {found:.2f}x "
                          f"(wanted {wanted:.2f}x: {'met' if found >= wanted else 'NOT met'})."]
    lines += [
        "",
        "Cost of the best run. CPU columns are cores busy (1.00 = one core); other CPU is"
        " everything else on the machine (other processes, hypervisor steal): when it is"
        " high, the run was disturbed.",
        "",
    ]
    header = ["server", "N", "server CPU us/delivery", "server CPU", "server RSS MB"]
    header += ["publishes/s", "load generator CPU", "other CPU", "undelivered", "closed subs"]
    columns = [("server_cpu_us_per_delivery", 2), ("server_cpu_util", 2), ("server_rss_mb", 1)]
    columns += [("publishes_per_s", 0), ("loadgen_cpu_util", 2), ("other_cpu_util", 2)]
    columns += [("undelivered", 0)]
    rows = detail_rows(servers, sizes, best, [*columns, ("subscribers_closed", 0)])
    return [*lines, *table(header, rows), ""]


def latency_section(results: list[Result], sizes: Sequence[int]) -> list[str]:
    found = keyed(results, "fanout_latency", "n")
    if not found:
        return []
    servers = [s for s in servers_in(results) if any((s, n) in found for n in sizes)]
    target = next(iter(found.values()))["target_deliveries_per_s"]

    def p99(server: str, n: int) -> float | None:
        result = found.get((server, n))
        return result["p99_ms"] if result else None

    def cell(server: str, n: int) -> str:
        r = found.get((server, n))
        if r is None:
            return "-"
        return f"{number(r['p50_ms'])} / {number(r['p99_ms'])} / {number(r['max_ms'])}"

    lines = [f"## Latency at a fixed {target:,.0f} deliveries/s (publish rate = rate / N)", ""]
    lines += ["p50 / p99 / max in ms, publish (HTTP POST sent) to receipt:", ""]
    header = ["server", *(f"N={n}" for n in sizes)]
    rows = [[s, *(cell(s, n) for n in sizes)] for s in servers]
    lines += table(header, rows + ratio_rows(servers, sizes, p99, invert=True))
    lines += ["", "Ratio rows compare p99; above 1.00x means Squall's p99 is lower.", ""]
    header = ["server", "N", "server CPU us/delivery", "server RSS MB", "undelivered"]
    columns = [("server_cpu_us_per_delivery", 2), ("server_rss_mb", 1), ("undelivered", 0)]
    rows = detail_rows(servers, sizes, found, columns)
    return [*lines, *table(header, rows), ""]


def idle_section(results: list[Result], sizes: Sequence[int]) -> list[str]:
    found = keyed(results, "idle", "n")
    if not found:
        return []
    servers = [s for s in servers_in(results) if any((s, n) in found for n in sizes)]

    def per_connection(server: str, n: int) -> float | None:
        result = found.get((server, n))
        return result["kb_per_connection"] if result else None

    lines = ["## Idle memory: server RSS per idle connection (WebSocket; SSE and TCP for "
             "squall-sse and squall-tcp)", ""]
    lines += ["(RSS after N more connections minus before) / N, in KiB:", ""]
    header = ["server", *(f"N={n}" for n in sizes), *(f"RSS at N={n}, MB" for n in sizes)]
    rows = []
    for server in servers:
        cells = [number(per_connection(server, n)) for n in sizes]
        totals = [
            number(found[(server, n)]["rss_after_mb"]) if (server, n) in found else "-"
            for n in sizes
        ]
        rows.append([server, *cells, *totals])
    extra = [
        [*row, *([""] * len(sizes))] for row in ratio_rows(servers, sizes, per_connection, True)
    ]
    lines += table(header, rows + extra)
    return [*lines, "", "Ratio rows: above 1.00x means Squall needs less memory.", ""]


INGEST_KINDS = (("single", "single POST"), ("batch", "batch POST"), ("ws", "WebSocket frames"),
                ("tcp", "TCP lines"), ("ndjson", "streaming batch"))
# (path, reference cell, target ratio): ingest targets, each a ratio within one run
INGEST_TARGETS = (
    ("batch", ("nchan", "single", 0), 2.0),
    ("ws", ("nchan", "single", 0), 1.0),
    ("tcp", ("nchan", "single", 0), 2.0),
    ("ndjson", ("nchan", "single", 0), 2.0),
)


def best_ingest(results: Iterable[Result]) -> dict[tuple[str, str, int], Result]:
    """The best ingest run per (server, path, subscribers)."""
    best: dict[tuple[str, str, int], Result] = {}
    for result in results:
        if result.get("measure") != "ingest" or "events_per_s" not in result:
            continue
        key = (result["target"], result["kind"], result.get("subscribers", 1))
        if key not in best or result["events_per_s"] > best[key]["events_per_s"]:
            best[key] = result
    return best


def ingest_section(results: list[Result]) -> list[str]:
    best = best_ingest(results)
    if not best:
        return []

    def events(cell: tuple[str, str, int]) -> float | None:
        result = best.get(cell)
        return result["events_per_s"] if result else None

    def check(value: float | None, reference: float | None, wanted: float) -> list[str]:
        if not value or not reference:
            return ["-", f"{wanted:.2f}x", "-"]
        found = value / reference
        return [f"{found:.2f}x", f"{wanted:.2f}x", "met" if found >= wanted else "NOT met"]

    batch = next((r["batch_size"] for (_, k, _), r in best.items() if k == "batch"), 100)
    lines = ["## Publish ingest: events/s accepted (best of the rounds)", ""]
    header = ["server", "subscribers", *(label for _, label in INGEST_KINDS)]
    header[3] = f"batch POST ({batch}/batch)"
    rows = []
    for server, subscribers in sorted({(k[0], k[2]) for k in best}):
        rows.append([server, str(subscribers), *(
            _ingest_cell(best.get((server, kind, subscribers))) for kind, _ in INGEST_KINDS)])
    lines += table(header, rows)
    lines += ["", "Each cell: events/s (server CPU per event in us).", ""]
    lines += ["Targets, each a ratio within this run:", ""]
    target_rows = []
    labels = dict(INGEST_KINDS)
    for kind, reference, wanted in INGEST_TARGETS:
        target_rows.append([f"{labels[kind]} / nchan single POST",
                            *check(events(("squall", kind, 0)), events(reference), wanted)])
    target_rows.append(["single POST, access log written / minimal Tornado handler",
                        *check(events(("squall-logged", "single", 0)),
                               events(("tornado-minimal", "single", 0)), 1.0)])
    target_rows.append(["Redis batch, Redis on the server's core / memory batch", *check(
        events(("squall-redis", "batch", 0)), events(("squall", "batch", 0)), 0.5)])
    target_rows.append(["Redis batch, Redis on a core of its own / memory batch", *check(
        events(("squall-redis-apart", "batch", 0)), events(("squall", "batch", 0)), 0.5)])
    target_rows.append(["Redis Cluster batch / Redis batch", *check(
        events(("squall-cluster", "batch", 0)), events(("squall-redis", "batch", 0)), 0.8)])
    for kind, label in INGEST_KINDS:
        target_rows.append([f"{label}: 100 subscribers / none", *check(
            events(("squall", kind, 100)), events(("squall", kind, 0)), 0.8)])
    lines += table(["path", "ratio", "target", ""], target_rows)
    return [*lines, ""]


def _ingest_cell(result: Result | None) -> str:
    if result is None:
        return "-"
    cost = result.get("server_cpu_us_per_event")
    return rate(result["events_per_s"]) + (f" ({cost:.1f})" if cost else "")


def write_markdown(
    path: Path,
    results: list[Result],
    sizes: Sequence[int],
    idle_sizes: Sequence[int],
    repeat: int,
    preamble: Sequence[str],
    notes: Sequence[str],
) -> None:
    """Write the full report."""
    lines = ["# Squall fan-out benchmark", "", *preamble, ""]
    lines += fanout_section(results, sizes, repeat)
    lines += latency_section(results, sizes)
    lines += idle_section(results, idle_sizes)
    lines += ingest_section(results)
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: list[Result], sizes: Sequence[int]) -> bool:
    """Deliveries/s and p99 latency against N; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return False
    best = best_max_rate(results)
    latency = keyed(results, "fanout_latency", "n")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in servers_in(results):
        xs = [n for n in sizes if (server, n) in best]
        left.plot(xs, [best[(server, n)]["deliveries_per_s"] for n in xs], "o-", label=server)
        xs = [n for n in sizes if latency.get((server, n), {}).get("p99_ms") is not None]
        right.plot(xs, [latency[(server, n)]["p99_ms"] for n in xs], "o-", label=server)
    left.set(xscale="log", xlabel="subscribers (N)", ylabel="deliveries/s")
    left.set_title("max fan-out rate (higher is better)")
    right.set(xscale="log", yscale="log" if latency else "linear", xlabel="subscribers (N)",
              ylabel="p99 latency, ms")
    right.set_title("p99 latency at a fixed delivery rate (lower is better)")
    for axes in (left, right):
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticks(list(sizes), [str(n) for n in sizes])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
