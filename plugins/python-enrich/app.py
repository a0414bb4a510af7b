"""The reference enrichment plugin in Python: same behaviour as plugins/rust-enrich.

Validates transaction events and adds derived fields (see plugins/README.md). Built into a
component by componentize-py (build.sh); `Transform` implements the exported `transform`
interface of the `sluice:plugin/plugin` world.
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import BatchResult, ErrorKind, OutputRecord, RecordError


class Reject(Exception):
    """A bad record: becomes a record-error, the batch goes on."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def schema(message: str) -> Reject:
    return Reject(ErrorKind.SCHEMA, message)


# --- config ------------------------------------------------------------------------------

CURRENCY = re.compile(r"[A-Z]{3}", re.ASCII)
# Rust's `str::trim` set, Unicode White_Space (a bare `str.strip()` also strips \x1c-\x1f).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def parse_config(raw: str) -> dict:
    """The stage config, with the same defaults and refusals as the Rust plugin."""
    try:
        config = json.loads(raw) if raw.strip(WHITE_SPACE) else {}
    except ValueError as e:
        raise Err(f"config is not valid JSON: {e}")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise Err("invalid config: expected an object")
    unknown = set(config) - {"version", "table", "currency_allowlist", "route_by_kind"}
    if unknown:
        raise Err(f"invalid config: unknown field `{sorted(unknown)[0]}`")
    version = config.get("version", "v1")
    table = config.get("table")
    allowlist = config.get("currency_allowlist", [])
    routes = config.get("route_by_kind", {})
    if not isinstance(version, str):
        raise Err("invalid config: `version` must be a string")
    if table is not None and not isinstance(table, str):
        raise Err("invalid config: `table` must be a string or null")
    if not isinstance(allowlist, list) or not all(isinstance(c, str) for c in allowlist):
        raise Err("invalid config: `currency_allowlist` must be a list of strings")
    if not isinstance(routes, dict) or not all(isinstance(t, str) for t in routes.values()):
        raise Err("invalid config: `route_by_kind` must map kinds to table names")
    if not version.strip(WHITE_SPACE):
        raise Err("config: `version` must not be empty")
    if table is not None and not table.strip(WHITE_SPACE):
        raise Err("config: `table` must not be empty (use null for the default table)")
    for c in allowlist:
        if not CURRENCY.fullmatch(c):
            raise Err(f"config: `currency_allowlist` entry {c!r} is not a 3-letter uppercase code")
    return {"version": version, "table": table, "allowlist": set(allowlist), "routes": routes}


# --- field getters -----------------------------------------------------------------------


def type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def get(event, field: str):
    if not isinstance(event, dict) or field not in event:
        raise schema(f"missing field /{field}")
    if event[field] is None:
        raise schema(f"field /{field} is null")
    return event[field]


def wrong_type(field: str, expected: str, v) -> Reject:
    return schema(f"field /{field}: expected {expected}, found {type_name(v)}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


DECIMAL = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?(?:[eE]([+-]?[0-9]+))?", re.ASCII)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def fixed_point(text: str, scale: int):
    """Decimal text as an integer count of 10^-scale units, rounded half away from zero;
    None if it is not a number or does not fit in 64 bits. Exact: no floating point."""
    m = DECIMAL.fullmatch(text)
    if not m or not (m[2] or m[3]):
        return None
    digits = m[2] + (m[3] or "")
    exponent = int(m[4] or 0)
    if not -(2**31) <= exponent < 2**31:
        return None  # as in the Rust SDK, the exponent must fit in 32 bits
    shift = scale + exponent - len(m[3] or "")
    keep = len(digits) + min(shift, 0)
    units = int(digits[:keep]) if keep > 0 else 0
    if units and shift > 0:
        if shift > 40:
            return None
        units *= 10**shift
    if 0 <= keep < len(digits) and digits[keep] >= "5":
        units += 1
    units = -units if m[1] == "-" else units
    return units if I64_MIN <= units <= I64_MAX else None


def get_amount_cents(event) -> int:
    v = get(event, "amount")
    if is_int(v):
        text = str(v)
    elif isinstance(v, float):
        text = repr(v)  # shortest text that reads back as the same number, like serde_json
    elif isinstance(v, str):
        text = v.strip(WHITE_SPACE)
    else:
        raise wrong_type("amount", "a number or a numeric string", v)
    cents = fixed_point(text, 2)
    if cents is None:
        raise schema(f"field /amount: {text!r} is not a decimal number that fits in 64 bits at scale 2")
    return cents


# --- timestamps (UTC, milliseconds, years 0000-9999) ------------------------------------

MS_PER_DAY = 86_400_000
MIN_MS, MAX_MS = -62_167_219_200_000, 253_402_300_799_999
RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)


def days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
    return era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719_468


def civil_from_days(days: int):
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if y % 4 == 0 and (y % 100 != 0 or y % 400 == 0) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def parse_rfc3339(text: str) -> int:
    m = RFC3339.fullmatch(text)
    if not m:
        raise schema(f"field /ts: {text!r} is not an RFC 3339 timestamp")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    # Fractions finer than a millisecond are truncated, never rounded.
    ms = int(((m[7] or "") + "000")[:3])
    offset = 0
    if m[8]:
        oh, om = int(m[9]), int(m[10])
        if oh > 23 or om > 59:
            raise schema(f"field /ts: {text!r}: UTC offset out of range")
        offset = (oh * 60 + om) * (-1 if m[8] == "-" else 1)
    if not (1 <= mo <= 12 and 1 <= d <= days_in_month(y, mo) and h <= 23 and mi <= 59 and s <= 59):
        raise schema(f"field /ts: {text!r}: date or time out of range")
    millis = days_from_civil(y, mo, d) * MS_PER_DAY + ((h * 60 + mi) * 60 + s) * 1000 + ms
    return check_epoch(millis - offset * 60_000)


def check_epoch(millis: int) -> int:
    if not MIN_MS <= millis <= MAX_MS:
        raise schema(f"field /ts: epoch {millis} ms is outside years 0000-9999")
    return millis


def get_timestamp_ms(event) -> int:
    v = get(event, "ts")
    if isinstance(v, str):
        return parse_rfc3339(v)
    if is_int(v) and I64_MIN <= v <= I64_MAX:
        return check_epoch(v)
    raise wrong_type("ts", "RFC 3339 text or an integer epoch", v)


def format_ts(millis: int):
    """(RFC 3339 UTC with milliseconds, YYYY-MM-DD)."""
    days, ms = divmod(millis, MS_PER_DAY)
    y, mo, d = civil_from_days(days)
    date = f"{y:04}-{mo:02}-{d:02}"
    return f"{date}T{ms // 3_600_000:02}:{ms // 60_000 % 60:02}:{ms // 1000 % 60:02}.{ms % 1000:03}Z", date


# --- the transform -----------------------------------------------------------------------


def reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_float(text: str) -> float:
    f = float(text)
    if f in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} out of range")
    return f


def serde_int(text: str):
    """Integers as serde_json reads them: `-0` is a float, and past the float range an error."""
    if text == "-0":
        return -0.0
    if len(text) > 300 and float(text) in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]}... out of range")
    return int(text)


NEGATIVE_ZERO = re.compile(rb"-0(?![0-9.eE])")
LONG_INTEGER = re.compile(rb"[0-9]{300}")
LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def too_deep(value: bytes) -> bool:
    """Like serde_json, refuse arrays and objects nested more than 127 deep."""
    if value.count(b"[") + value.count(b"{") < 128:
        return False
    depth, in_string, escaped = 0, False, False
    for c in value:
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = c == 0x5C, c != 0x22  # backslash, quote
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            if depth >= 128:
                return True
        elif c in b"]}":
            depth -= 1
    return False


def enrich(config: dict, value: bytes, partition: int, offset: int):
    """(table or None, row bytes) for one record, or raises Reject."""
    try:
        # The slower integer hook is needed only for `-0` and very long integers.
        unusual = NEGATIVE_ZERO.search(value) or (len(value) > 300 and LONG_INTEGER.search(value))
        ints = {"parse_int": serde_int} if unusual else {}
        event = json.loads(value.decode("utf-8"), parse_constant=reject_constant, parse_float=strict_float, **ints)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueError
        raise Reject(ErrorKind.PARSE, f"payload is not valid JSON: {e}")
    if too_deep(value):
        raise Reject(ErrorKind.PARSE, "payload is not valid JSON: recursion limit exceeded")
    if LONE_SURROGATE.search(value):
        # json accepts escaped lone surrogates ("\ud800"), which no UTF-8 row can hold.
        try:
            json.dumps(event, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Reject(ErrorKind.PARSE, "payload is not valid JSON: lone surrogate escape")

    id_ = get(event, "id")
    if not isinstance(id_, str):
        raise wrong_type("id", "a string", id_)
    if not id_.strip(WHITE_SPACE):
        raise schema("field /id is empty")
    user_id = get(event, "user_id")
    if not (is_int(user_id) and 0 <= user_id < 2**64):
        raise wrong_type("user_id", "a non-negative integer", user_id)
    cents = get_amount_cents(event)
    currency = get(event, "currency")
    if not isinstance(currency, str):
        raise wrong_type("currency", "a string", currency)
    if not CURRENCY.fullmatch(currency):
        raise schema(f"field /currency: expected a 3-letter uppercase code, found {currency!r}")
    if config["allowlist"] and currency not in config["allowlist"]:
        raise Reject(ErrorKind.INVALID, f"currency {currency} is not in the allowlist")
    ts, date = format_ts(get_timestamp_ms(event))

    event["ts"] = ts
    event["amount_cents"] = cents
    event["amount_bucket"] = "small" if cents < 1_000 else "medium" if cents < 10_000 else "large"
    event["event_date"] = date
    event["source_partition"] = partition
    event["source_offset"] = offset
    event["plugin_version"] = config["version"]
    kind = event.get("kind")
    table = config["routes"].get(kind, config["table"]) if isinstance(kind, str) else config["table"]
    return table, json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class Transform(exports.Transform):
    config = None

    def init(self, config: str) -> None:
        Transform.config = parse_config(config)

    def process(self, batch):
        config = Transform.config
        if config is None:
            raise RuntimeError("process called before a successful init")
        outputs, errors = [], []
        for i, record in enumerate(batch):
            try:
                table, row = enrich(config, record.value, record.source.partition, record.source.offset)
            except Reject as r:
                errors.append(RecordError(i, r.kind, r.message))
            else:
                outputs.append(OutputRecord(i, table, None, row, []))
        return BatchResult(outputs, errors)
