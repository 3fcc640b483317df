"""Benchmark driver: Squall against a chat-demo Tornado baseline and nchan, in one run.

    python bench/run.py            # the full run (about 7 minutes)
    python bench/run.py --quick    # a smoke run: small N, short durations

Each server runs pinned to core 0 and the load generator (``loadgen.py``) to core 1.
For N in 100, 1000 and 5000 subscribers: max deliveries/s (best of ``--repeat``) and
latency at a fixed 10,000 deliveries/s; then server RSS per idle WebSocket connection
at 5,000 and 9,000 connections; then publish ingest with one subscriber. Every cell
gets a fresh server on a fresh port. Writes ``results/results.md``,
``results/fanout.png`` and the raw JSON lines in ``results/raw.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import report
import servers

LOADGEN = servers.BENCH_DIR / "loadgen.py"
# Keep-alive publisher connections, one request in flight on each. Enough that a
# server always has publishes waiting while the load generator reads a burst.
PUBLISHERS = 64
Result = dict[str, Any]
# the same server as "squall", other subscribers: its ingest is measured once, there
ONE_PUBLISH_PATH = ("squall-sse", "squall-tcp")


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run."""

    sizes: tuple[int, ...]
    idle_sizes: tuple[int, ...]
    repeat: int
    duration: float
    warmup: float
    latency_rate: float
    latency_duration: float
    ingest_duration: float
    batch_size: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            sizes=tuple(args.sizes or ((20, 200) if quick else (100, 1000, 5000))),
            idle_sizes=tuple(args.idle_sizes or ((200, 500) if quick else (5000, 9000))),
            repeat=args.repeat if args.repeat is not None else (1 if quick else 3),
            duration=args.duration or (1.0 if quick else 5.0),
            warmup=0.3 if quick else 1.0,
            latency_rate=args.latency_rate,
            latency_duration=args.latency_duration or (2.0 if quick else 8.0),
            ingest_duration=1.0 if quick else 4.0,
            batch_size=100,
        )


class Driver:
    """Starts servers, runs the load generator against them and collects its results."""

    def __init__(self, plan: Plan, out_dir: Path, pin: bool) -> None:
        self.plan = plan
        self.log_dir = out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server_cpu, self.loadgen_cpu = pick_cpus(pin)
        self.results: list[Result] = []
        self.notes: list[str] = []
        self.broken: set[str] = set()

    def run_cell(self, target: str, mode_args: list[str], timeout: float) -> list[Result]:
        """One fresh server, one load generator invocation; returns its JSON lines."""
        if target in self.broken:
            return []
        try:
            server = servers.STARTERS[target](self.server_cpu, self.log_dir)
        except servers.ServerError as exc:
            self.skip(target, str(exc))
            return []
        try:
            return self._loadgen(server, mode_args, timeout)
        finally:
            server.stop()

    def _loadgen(
        self, server: servers.Server, mode_args: list[str], timeout: float
    ) -> list[Result]:
        command = [sys.executable, str(LOADGEN), "--target", server.name]
        command += ["--port", str(server.port), "--publishers", str(PUBLISHERS)]
        command += ["--tcp-port", str(server.tcp_port)] if server.tcp_port else []
        command += [arg for pid in server.pids for arg in ("--server-pid", str(pid))]
        command = servers.pinned([*command, *mode_args], self.loadgen_cpu)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            self.notes.append(
                f"{server.name} {' '.join(mode_args)}: timed out after {timeout:.0f} s"
            )
            done = subprocess.CompletedProcess(command, -1, _text(exc.stdout), _text(exc.stderr))
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            if "error" in line:
                self.notes.append(f"{server.name} {' '.join(mode_args)}: {line['error']}")
            print(summary(line), flush=True)
        if done.returncode not in (0, 1, -1):
            tail = done.stderr.strip().splitlines()[-3:]
            self.notes.append(f"{server.name}: load generator exited {done.returncode}: {tail}")
        good = [line for line in lines if "error" not in line]
        self.results.extend(good)
        return good

    def skip(self, target: str, reason: str) -> None:
        self.broken.add(target)
        first_line = reason.strip().splitlines()[0] if reason.strip() else "failed"
        self.notes.append(f"{target} skipped: {first_line}")
        print(f"-- {target} skipped: {reason}", flush=True)


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def pick_cpus(pin: bool) -> tuple[int | None, int | None]:
    """Server and load generator cores: the first two this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def summary(line: Result) -> str:
    """One console line per measurement."""
    if "error" in line:
        return f"   {line['target']}: ERROR {line['error']}"
    if line["measure"] == "ingest" and "events_per_s" in line:
        return (f"   {line['target']:8} ingest {line['kind']}, {line['subscribers']} subscribers: "
                f"{report.rate(line['events_per_s'])}, "
                f"{report.number(line.get('server_cpu_us_per_event'), 2)} us/event")
    measure, target = line["measure"], line["target"]
    if measure == "fanout_max":
        return (
            f"   {target:8} N={line['n']:<5} run {line['run']}: "
            f"{report.rate(line['deliveries_per_s'])}, "
            f"{report.number(line['server_cpu_us_per_delivery'], 2)} us/delivery"
        )
    if measure == "fanout_latency":
        return (
            f"   {target:8} N={line['n']:<5} latency p50 {line['p50_ms']} ms, "
            f"p99 {line['p99_ms']} ms, max {line['max_ms']} ms"
        )
    if measure == "idle":
        return f"   {target:8} N={line['n']:<5} idle: {line['kb_per_connection']} KiB/connection"
    if "skipped" in line:
        return f"   {target:8} ingest {line['kind']}: skipped ({line['skipped']})"
    return f"   {target:8} ingest {line['kind']}: {report.rate(line['events_per_s'])}"


# Squall on the shared brokers: measured at one N (the one nearest BROKER_SIZE), against
# the memory broker there, and left out of the idle cells (the broker holds no socket).
BROKER_TARGETS = ("squall-redis", "squall-cluster")
# measured in the ingest cells only: fan-out's load generator needs its whole core
INGEST_ONLY = ("squall-redis-apart",)
BROKER_SIZE = 1000


def run_fanout(driver: Driver, targets: Sequence[str], interleave: bool = False) -> None:
    """Max rate (best of ``repeat``) and latency per target and N. With ``interleave``
    the targets take turns, one max-rate run each per round (latency in the last
    round), so that a busy spell of the machine falls on all of them alike."""
    plan = driver.plan
    rounds = plan.repeat if interleave else 1
    broker_size = min(plan.sizes, key=lambda n: abs(n - BROKER_SIZE))
    for n in plan.sizes:
        print(f"== fan-out, N={n}", flush=True)
        here = [t for t in targets if t not in INGEST_ONLY
                and (t not in BROKER_TARGETS or n == broker_size)]
        for index in range(rounds):
            last = index == rounds - 1
            for target in here:
                repeat = 1 if interleave else plan.repeat
                args = ["fanout", "-n", str(n), "--repeat", str(repeat), "--run-offset",
                        str(index)]
                args += ["--duration", str(plan.duration), "--warmup", str(plan.warmup)]
                args += ["--latency-rate", str(plan.latency_rate if last else 0)]
                args += ["--latency-duration", str(plan.latency_duration)]
                per_run = plan.warmup + plan.duration + 40
                timeout = 60 + n / 200 + repeat * per_run + plan.latency_duration + 45
                driver.run_cell(target, args, timeout)


def run_idle(driver: Driver, targets: Sequence[str]) -> None:
    for n in driver.plan.idle_sizes:
        print(f"== idle connections, N={n}", flush=True)
        for target in (t for t in targets if t not in (*BROKER_TARGETS, *INGEST_ONLY)):
            driver.run_cell(target, ["idle", "-n", str(n)], timeout=120 + n / 50)


# Ingest cells: (target, publish paths, subscribers of the published topic). Squall's
# paths without subscribers and with 100, against nchan's single POST, a minimal
# Tornado handler, Squall with its access log written, and the Redis broker's batch (its
# redis-server on the server's core, and apart on the load generator's).
INGEST_CELLS = (
    ("squall", ("single", "batch", "ws", "tcp", "ndjson"), 0),
    ("squall", ("single", "batch", "ws", "tcp", "ndjson"), 100),
    ("squall-logged", ("single",), 0),
    ("tornado-minimal", ("single",), 0),
    ("nchan", ("single",), 0),
    ("squall-redis", ("batch",), 0),
    ("squall-redis-apart", ("batch",), 0),
    ("squall-cluster", ("batch",), 0),
)
INGEST_TARGETS = ("squall-logged", "tornado-minimal")  # measured whenever squall is


def run_ingest(driver: Driver, targets: Sequence[str]) -> None:
    """Best of ``repeat`` rounds; in each, every cell once (the targets take turns)."""
    plan = driver.plan
    wanted = set(targets) | (set(INGEST_TARGETS) if "squall" in targets else set())
    cells = [cell for cell in INGEST_CELLS if cell[0] in wanted]
    for index in range(plan.repeat):
        print(f"== publish ingest, round {index + 1} of {plan.repeat}", flush=True)
        for target, kinds, subscribers in cells:
            args = ["ingest", "--kind", *kinds, "--subscribers", str(subscribers)]
            args += ["--duration", str(plan.ingest_duration), "--warmup", str(plan.warmup)]
            args += ["--batch-size", str(plan.batch_size)]
            driver.run_cell(target, args,
                            timeout=60 + len(kinds) * (plan.ingest_duration + 30))


def available_targets(requested: Sequence[str], driver: Driver) -> list[str]:
    """The requested targets that can run here; the others get a note."""
    targets = []
    for target in requested:
        if target in ("nchan",) and servers.nchan_module() is None:
            driver.skip(target, "nginx with the nchan module is not installed (see README.md)")
        elif target.startswith("squall") and not (servers.ROOT / "run.py").exists():
            driver.skip(target, "run.py not found")
        elif target.startswith("squall-redis") and servers.find_redis_server() is None:
            driver.skip(target, "no redis-server (apt-get install redis-server)")
        elif target == "squall-cluster" and servers.find_cluster_tools() is None:
            driver.skip(target, "no redis-server and redis-cli (apt-get install "
                        "redis-server redis-tools)")
        else:
            targets.append(target)
    return targets


def preamble(plan: Plan, driver: Driver, quick: bool, started: float) -> list[str]:
    """Lines describing when, where and how the numbers were measured."""
    pinning = (
        f"server on core {driver.server_cpu}, load generator on core {driver.loadgen_cpu}"
        if driver.server_cpu is not None
        else "not pinned"
    )
    return [
        f"Run of {datetime.datetime.now().isoformat(timespec='minutes')}"
        + (" (quick smoke run: not comparable with full runs)" if quick else "")
        + f", {time.monotonic() - started:.0f} s.",
        "",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}; {versions()}.",
        f"- Pinning: {pinning}. Loopback only.",
        f"- Fan-out: 100-byte JSON events over {PUBLISHERS} keep-alive HTTP/1.1 publisher "
        f"connections to N WebSocket subscribers on one topic; {plan.warmup:g} s warm-up, then "
        f"{plan.duration:g} s measured; best of {plan.repeat}.",
        f"- Latency: {plan.latency_rate:,.0f} deliveries/s for {plan.latency_duration:g} s.",
        "- Server CPU = utime + stime from /proc of the server process (the nginx worker for "
        "nchan); RSS = VmRSS. Results swing between runs on shared machines: compare "
        "within one run.",
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def versions() -> str:
    parts = []
    for package in ("tornado", "uvloop"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} missing")
    if servers.nchan_module() is not None:
        command = [servers.nginx_binary(), "-v"]
        nginx = subprocess.run(command, capture_output=True, text=True, check=False)
        parts.append(nginx.stderr.strip().replace("nginx version: ", "") + " with nchan")
    return ", ".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small N, short runs")
    parser.add_argument("--repeat", type=int, help="max-rate runs per cell (default 3)")
    parser.add_argument("--targets", default="squall,squall-sse,squall-tcp,squall-base,"
                        "squall-redis,squall-redis-apart,squall-cluster,baseline,nchan",
                        help="comma-separated")
    parser.add_argument("--sizes", type=int, nargs="+", help="subscriber counts N")
    parser.add_argument("--idle-sizes", type=int, nargs="+", help="idle connection counts")
    parser.add_argument("--duration", type=float, help="measured seconds per max-rate run")
    parser.add_argument("--latency-rate", type=float, default=10000.0, help="deliveries/s")
    parser.add_argument("--latency-duration", type=float, help="seconds of fixed-rate publishing")
    parser.add_argument("--skip", nargs="*", default=[], choices=("fanout", "idle", "ingest"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--interleave", action="store_true",
                        help="fan-out: targets take turns, one max-rate run each per round")
    parser.add_argument("--out", type=Path, default=servers.BENCH_DIR / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement and write the report; exit status 1 if nothing ran."""
    args = parse_args(argv)
    started = time.monotonic()
    plan = Plan.from_args(args)
    too_big = [n for n in (*plan.sizes, *plan.idle_sizes) if n > 9000]
    if too_big:
        print(f"at most 9000 connections fit the open-file limit: {too_big}", file=sys.stderr)
        return 2
    driver = Driver(plan, args.out, pin=not args.no_pin)
    targets = available_targets([t for t in args.targets.split(",") if t], driver)
    if "fanout" not in args.skip:
        run_fanout(driver, targets, args.interleave)
    if "idle" not in args.skip:
        run_idle(driver, targets)
    if "ingest" not in args.skip:
        run_ingest(driver, targets)
    write_outputs(args.out, driver, plan, args.quick, started)
    return 0 if driver.results else 1


def write_outputs(out: Path, driver: Driver, plan: Plan, quick: bool, started: float) -> None:
    with (out / "raw.jsonl").open("w") as raw:
        raw.writelines(json.dumps(result) + "\n" for result in driver.results)
    markdown = out / "results.md"
    report.write_markdown(
        markdown,
        driver.results,
        plan.sizes,
        plan.idle_sizes,
        plan.repeat,
        preamble(plan, driver, quick, started),
        driver.notes,
    )
    plotted = report.write_plot(out / "fanout.png", driver.results, plan.sizes)
    print(f"wrote {markdown}" + (f" and {out / 'fanout.png'}" if plotted else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
