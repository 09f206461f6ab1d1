"""``kwatt report``: energy, carbon, cost and J/token per namespace or workload for a
period, read from a Prometheus that scrapes kwatt and evaluates its recording rules.

The queries are the dashboards' own (kwatt_dashboards.common.over_range with the range
and a one-minute step): emissions and cost are integrals of the recorded per-second rates,
so an hour of dirty grid weighs as an hour, not as the value at the period's end. Energy
is the counters' increase over the period. Bad arguments exit 2; an unreachable
Prometheus, a refused query or missing rules exit 1; each with one line on stderr.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

STEP_SECONDS = 60
JOULES_PER_KWH = 3.6e6
# One of these must be loaded, or every carbon column would be silently empty.
REQUIRED_RULES = ("namespace:kwatt_carbon_grams_per_second:rate5m",
                  "workload:kwatt_carbon_grams_per_second:rate5m")
_DURATION = re.compile(r"^(?:(\d+)(w|d|h|m|s))+$")
_DURATION_PART = re.compile(r"(\d+)(w|d|h|m|s)")
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


class ReportError(Exception):
    """A problem worth one line: what failed and where."""


@dataclass(frozen=True)
class Grouping:
    name: str
    labels: tuple[str, ...]
    energy_counter: str
    rule_level: str


GROUPINGS = {
    "namespace": Grouping("namespace", ("cluster", "namespace"),
                          "kwatt_namespace_energy_joules_total", "namespace"),
    "workload": Grouping("workload", ("cluster", "namespace", "workload_kind", "workload"),
                         "kwatt_workload_energy_joules_total", "workload"),
}


def parse_duration(text: str) -> int:
    if not _DURATION.match(text):
        raise ValueError(f"not a duration like 1d, 12h or 90m: {text!r}")
    seconds = sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))
    if seconds < STEP_SECONDS:
        raise ValueError(f"must be at least 1m: {text!r}")
    return seconds


def parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time or Unix seconds: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def over_range(rate: str, window_seconds: int) -> str:
    """kwatt_dashboards.common.over_range with $__range and $__interval filled in, the
    range 1 ms short: Prometheus 2 ranges include both ends, so a period ending on a whole
    minute would also read the step of the minute before it began."""
    return (f"sum_over_time({rate}[{window_seconds * 1000 - 1}ms:{STEP_SECONDS}s]) "
            f"* {STEP_SECONDS * 1000} / 1000")


def queries(grouping: Grouping, window_seconds: int) -> dict[str, str]:
    by = ", ".join(grouping.labels)
    level = grouping.rule_level

    def integral(rule: str, extra: str = "") -> str:
        keys = f"{by}, {extra}" if extra else by
        return f"sum by ({keys}) ({over_range(rule, window_seconds)})"

    return {
        "joules": f"sum by ({by}) (increase({grouping.energy_counter}[{window_seconds}s]))",
        "operational": integral(f"{level}:kwatt_carbon_grams_per_second:rate5m"),
        "embodied": integral(f"{level}:kwatt_embodied_grams_per_second:rate5m"),
        "cost": integral(f"{level}:kwatt_cost_per_second:rate5m", "currency"),
        "serving_joules": integral(f"{level}:kwatt_serving_power_watts:rate5m"),
        "tokens": integral(f"{level}:kwatt_generated_tokens:rate5m"),
    }


@dataclass
class Row:
    key: tuple[str, ...]
    joules: float | None = None
    operational: float | None = None
    embodied: float | None = None
    cost: dict[str, float] = field(default_factory=dict)
    serving_joules: float | None = None
    tokens: float | None = None

    @property
    def kwh(self) -> float | None:
        return None if self.joules is None else self.joules / JOULES_PER_KWH

    @property
    def joules_per_token(self) -> float | None:
        if self.serving_joules is None or not self.tokens:
            return None
        return self.serving_joules / self.tokens


@dataclass(frozen=True)
class Auth:
    bearer_token: str | None = None
    basic: tuple[str, str] | None = None


class Prometheus:
    """The HTTP API of one Prometheus (or compatible) server."""

    def __init__(self, url: str, auth: Auth, context: ssl.SSLContext | None,
                 timeout: float) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.context = context
        self.timeout = timeout

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        request = urllib.request.Request(f"{self.url}{path}?{query}")
        if self.auth.bearer_token is not None:
            request.add_header("Authorization", f"Bearer {self.auth.bearer_token}")
        elif self.auth.basic is not None:
            pair = f"{self.auth.basic[0]}:{self.auth.basic[1]}".encode()
            request.add_header("Authorization", "Basic " + base64.b64encode(pair).decode())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.context) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise ReportError(f"Prometheus at {self.url} answered {exc.code} {exc.reason} "
                              f"to {path}{_reason(exc)}{_hint(exc.code)}") from None
        except urllib.error.URLError as exc:
            raise ReportError(f"cannot reach Prometheus at {self.url}: {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise ReportError(f"cannot read Prometheus at {self.url}: {exc}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise ReportError(f"Prometheus at {self.url} refused {path}: {error}")
        return body.get("data")

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        return list(data.get("result", [])) if isinstance(data, dict) else []

    def recorded_rules(self) -> set[str]:
        data = self.get("/api/v1/rules", type="record")
        return {rule.get("name", "") for group in (data or {}).get("groups", [])
                for rule in group.get("rules", [])}


def _reason(error: urllib.error.HTTPError) -> str:
    """Prometheus' own explanation from an error reply, on the same line."""
    try:
        body = json.loads(error.read(65536))
    except (OSError, ValueError):
        return ""
    reason = body.get("error") if isinstance(body, dict) else None
    return f": {' '.join(str(reason).split())}" if reason else ""


def _hint(code: int) -> str:
    if code in (401, 403):
        return " (check --bearer-token-file or --basic-auth.username/--basic-auth.password-file)"
    if code == 404:
        return " (is --prometheus.url the server's base URL?)"
    return ""


def collect(prometheus: Prometheus, grouping: Grouping, start: float,
            end: float) -> list[Row]:
    missing = set(REQUIRED_RULES) - prometheus.recorded_rules()
    if missing == set(REQUIRED_RULES):
        raise ReportError(
            f"the kwatt recording rules are not loaded in Prometheus at {prometheus.url} "
            f"(no {', '.join(sorted(missing))}); load dashboards/rules/kwatt-rules.yaml or "
            "enable the chart's prometheusRule")
    window = round(end - start)
    rows: dict[tuple[str, ...], Row] = {}
    for name, expr in queries(grouping, window).items():
        for series in prometheus.instant(expr, end):
            labels = series.get("metric", {})
            value = float(series["value"][1])
            if math.isnan(value) or math.isinf(value):
                continue
            key = tuple(labels.get(label, "") for label in grouping.labels)
            row = rows.setdefault(key, Row(key))
            if name == "cost":
                row.cost[labels.get("currency", "")] = value
            else:
                setattr(row, name, value)
    return [rows[key] for key in sorted(rows)]


def _columns(grouping: Grouping, rows: list[Row]) -> tuple[list[str], list[str]]:
    labels = [label for label in grouping.labels
              if label != "cluster" or any(row.key[0] for row in rows)]
    currencies = sorted({currency for row in rows for currency in row.cost})
    return labels, currencies


def _record(grouping: Grouping, row: Row, labels: list[str],
            currencies: list[str]) -> dict[str, Any]:
    values = dict(zip(grouping.labels, row.key, strict=True))
    record: dict[str, Any] = {label: values[label] for label in labels}
    record.update({"kwh": row.kwh, "operational_gco2e": row.operational,
                   "embodied_gco2e": row.embodied})
    record.update({f"cost_{currency}": row.cost.get(currency) for currency in currencies})
    record["joules_per_token"] = row.joules_per_token
    return record


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render(grouping: Grouping, rows: list[Row], fmt: str, start: float, end: float,
           out: TextIO) -> None:
    labels, currencies = _columns(grouping, rows)
    records = [_record(grouping, row, labels, currencies) for row in rows]
    if fmt == "json":
        json.dump({"start": _iso(start), "end": _iso(end), "by": grouping.name,
                   "rows": records}, out, indent=2)
        out.write("\n")
        return
    header = [*labels, "kwh", "operational_gco2e", "embodied_gco2e",
              *(f"cost_{c}" for c in currencies), "joules_per_token"]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for record in records:
            writer.writerow(["" if record[h] is None else record[h] for h in header])
        return
    digits = {"kwh": 4, "operational_gco2e": 2, "embodied_gco2e": 2, "joules_per_token": 3}
    cells = [[_fmt(record[h], digits.get(h, 4)) for h in header] for record in records]
    titles = [*labels, "kWh", "operational gCO2e", "embodied gCO2e",
              *(f"cost {c}" for c in currencies), "J/token"]
    widths = [max([len(t), *(len(c[i]) for c in cells)]) for i, t in enumerate(titles)]
    out.write(f"kwatt report {_iso(start)} to {_iso(end)}, by {grouping.name}\n")
    for line in [titles, *cells]:
        out.write("  ".join(cell.ljust(widths[i]) if i < len(labels) else cell.rjust(widths[i])
                            for i, cell in enumerate(line)).rstrip() + "\n")


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        print(f"kwatt report: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kwatt report", description=(
        "Energy, operational and embodied carbon, cost and J/token per namespace or "
        "workload over a period, from Prometheus."))
    parser.add_argument("--prometheus.url", dest="url", required=True,
                        help="base URL of the Prometheus HTTP API, e.g. http://prometheus:9090")
    parser.add_argument("--by", choices=sorted(GROUPINGS), default="namespace")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--period", default="1d",
                        help="length of the period ending at --end, e.g. 1d, 7d, 12h "
                             "(default 1d); ignored with --start")
    parser.add_argument("--start", help="period start: RFC 3339 or Unix seconds")
    parser.add_argument("--end", help="period end: RFC 3339 or Unix seconds (default now)")
    parser.add_argument("--bearer-token-file", help="file holding a bearer token")
    parser.add_argument("--basic-auth.username", dest="basic_user")
    parser.add_argument("--basic-auth.password-file", dest="basic_password_file")
    parser.add_argument("--tls.ca-file", dest="ca_file",
                        help="CA bundle to verify Prometheus' certificate (verification is "
                             "always on)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds per HTTP request (default 30)")
    return parser


def _read_secret(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def _setup(args: argparse.Namespace, now: float) -> tuple[Prometheus, float, float]:
    end = parse_time(args.end) if args.end else now
    start = parse_time(args.start) if args.start else end - parse_duration(args.period)
    if end - start < STEP_SECONDS:
        raise ValueError("--start must be at least 1m before --end")
    scheme = urllib.parse.urlsplit(args.url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"--prometheus.url: expected http:// or https://, got {args.url!r}")
    auth = Auth()
    if args.bearer_token_file:
        auth = Auth(bearer_token=_read_secret(args.bearer_token_file, "--bearer-token-file"))
    elif args.basic_user:
        if not args.basic_password_file:
            raise ValueError("--basic-auth.username needs --basic-auth.password-file")
        auth = Auth(basic=(args.basic_user, _read_secret(
            args.basic_password_file, "--basic-auth.password-file")))
    context = None
    if scheme == "https":
        try:
            context = ssl.create_default_context(cafile=args.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--tls.ca-file: cannot load {args.ca_file}: {exc}") from None
    return Prometheus(args.url, auth, context, args.timeout), start, end


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         clock: Callable[[], float] = time.time) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stdout = out or sys.stdout
    try:
        prometheus, start, end = _setup(args, clock())
    except ValueError as exc:
        print(f"kwatt report: {exc}", file=sys.stderr)
        return 2
    grouping = GROUPINGS[args.by]
    try:
        rows = collect(prometheus, grouping, start, end)
    except ReportError as exc:
        print(f"kwatt report: {exc}", file=sys.stderr)
        return 1
    buffer = io.StringIO()
    render(grouping, rows, args.format, start, end, buffer)
    stdout.write(buffer.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
