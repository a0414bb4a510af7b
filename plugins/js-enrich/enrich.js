// The reference enrichment plugin in JavaScript: the same behaviour as plugins/rust-enrich
// (see plugins/README.md). componentize-js (build.sh) turns this ES module into a component;
// `transform` implements the exported interface of the `sluice:plugin/plugin` world.

class Reject extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}
const schema = (message) => new Reject("schema", message);

let config = null;

export const transform = {
  // Throwing a string returns it as the `err` of `init`: the host refuses the plugin.
  init(raw) {
    config = null;
    config = parseConfig(raw);
  },

  process(batch) {
    if (config === null) throw new Error("process called before a successful init");
    const outputs = [];
    const errors = [];
    batch.forEach((record, input) => {
      try {
        const [table, row] = enrich(record);
        outputs.push({ input, table, key: undefined, value: utf8.encode(row), headers: [] });
      } catch (e) {
        if (!(e instanceof Reject)) throw e; // a bug, not bad data: let the instance trap
        errors.push({ input, kind: e.kind, message: e.message });
      }
    });
    return { outputs, errors };
  },
};

// ---- config -------------------------------------------------------------------------------

const CURRENCY = /^[A-Z]{3}$/;
const FIELDS = new Set(["version", "table", "currency_allowlist", "route_by_kind"]);

function parseConfig(raw) {
  let c;
  try {
    c = raw.trim() === "" ? {} : JSON.parse(raw);
  } catch (e) {
    throw `config is not valid JSON: ${e.message}`;
  }
  c ??= {};
  if (typeof c !== "object" || Array.isArray(c)) throw "invalid config: expected an object";
  for (const key of Object.keys(c)) {
    if (!FIELDS.has(key)) throw `invalid config: unknown field \`${key}\``;
  }
  const { version = "v1", table = null, currency_allowlist = [], route_by_kind = {} } = c;
  const isString = (v) => typeof v === "string";
  if (!isString(version)) throw "invalid config: `version` must be a string";
  if (table !== null && !isString(table)) throw "invalid config: `table` must be a string or null";
  if (!Array.isArray(currency_allowlist) || !currency_allowlist.every(isString)) {
    throw "invalid config: `currency_allowlist` must be a list of strings";
  }
  const routes = route_by_kind && typeof route_by_kind === "object" ? Object.entries(route_by_kind) : null;
  if (!routes || Array.isArray(route_by_kind) || !routes.every(([, t]) => isString(t))) {
    throw "invalid config: `route_by_kind` must map kinds to table names";
  }
  if (trim(version) === "") throw "config: `version` must not be empty";
  if (table !== null && trim(table) === "") {
    throw "config: `table` must not be empty (use null for the default table)";
  }
  const bad = currency_allowlist.find((code) => !CURRENCY.test(code));
  if (bad !== undefined) {
    throw `config: \`currency_allowlist\` entry ${JSON.stringify(bad)} is not a 3-letter uppercase code`;
  }
  return { version, table: table ?? undefined, allowlist: new Set(currency_allowlist), routes: new Map(routes) };
}

// ---- JSON as serde_json reads it ----------------------------------------------------------

const utf8 = new TextEncoder();
// `ignoreBOM` keeps a byte order mark, which then fails JSON.parse as in serde_json.
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

// JSON.parse loses what serde_json keeps: `42.0` is not an integer there, integers stay exact
// up to 64 bits, and `-0` is a float. Such numbers stay their source text (JSON.rawJSON), so
// they pass through unchanged and the type checks below see what the Rust plugin sees.
function reviveNumber(_key, value, context) {
  if (typeof value !== "number") return value;
  if (!Number.isFinite(value)) throw new SyntaxError(`number ${context.source} out of range`);
  const source = context.source;
  if (!/^-?\d+$/.test(source)) return Number.isInteger(value) ? JSON.rawJSON(source) : value;
  if (Number.isSafeInteger(value) && source !== "-0") return value;
  if (source === "-0") return JSON.rawJSON(source); // a float in serde_json
  const big = BigInt(source);
  return big >= -(2n ** 63n) && big < 2n ** 64n ? JSON.rawJSON(source) : value;
}

function parseEvent(bytes) {
  try {
    const text = strictUtf8.decode(bytes);
    if (tooDeep(text)) throw new SyntaxError("recursion limit exceeded");
    const event = JSON.parse(text, reviveNumber);
    // JSON.parse accepts escaped lone surrogates ("\ud800"), which no UTF-8 row can hold.
    if (/\\u[dD][89a-fA-F]/.test(text) && !wellFormed(event)) throw new SyntaxError("lone surrogate escape");
    return event;
  } catch (e) {
    throw new Reject("parse", `payload is not valid JSON: ${e.message}`);
  }
}

// Like serde_json, refuse arrays and objects nested more than 127 deep.
function tooDeep(text) {
  if (text.length < 256) return false; // 128 openings need 128 closings
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[" || c === "{") {
      if (++depth >= 128) return true;
    } else if (c === "]" || c === "}") depth--;
  }
  return false;
}

function wellFormed(v) {
  if (typeof v === "string") return v.isWellFormed();
  if (v === null || typeof v !== "object" || JSON.isRawJSON(v)) return true;
  return Object.entries(v).every(([k, e]) => k.isWellFormed() && wellFormed(e));
}

const isRaw = (v) => typeof v === "object" && v !== null && JSON.isRawJSON(v);

function typeName(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number" || isRaw(v)) return "number";
  return typeof v === "object" ? "object" : typeof v; // string, boolean
}

function get(event, field) {
  const isObject = typeof event === "object" && event !== null && !Array.isArray(event);
  if (!isObject || !Object.hasOwn(event, field)) throw schema(`missing field /${field}`);
  const v = event[field];
  if (v === null) throw schema(`field /${field} is null`);
  return v;
}

const wrongType = (field, expected, v) => schema(`field /${field}: expected ${expected}, found ${typeName(v)}`);

function getString(event, field) {
  const v = get(event, field);
  if (typeof v !== "string") throw wrongType(field, "a string", v);
  return v;
}

// Rust's `str::trim`: Unicode White_Space (not quite JavaScript's `trim`).
const SPACE = "\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const EDGE_SPACE = new RegExp(`^[${SPACE}]+|[${SPACE}]+$`, "g");
const trim = (s) => s.replace(EDGE_SPACE, "");

// ---- amounts: exact decimal text to 10^-scale units ---------------------------------------

const DECIMAL = /^([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;
const LIMIT = 2n ** 63n;

function fixedPoint(text, scale) {
  const m = DECIMAL.exec(text);
  if (!m || (m[2] === "" && !m[3])) return null;
  const [, sign, whole, frac = "", exp = "0"] = m;
  const exponent = Number(exp);
  if (!Number.isInteger(exponent) || exponent < -(2 ** 31) || exponent >= 2 ** 31) return null;
  const digits = whole + frac;
  // The value is digits * 10^shift units; with shift < 0 only the leading `keep` digits
  // count and the one after them decides the rounding (half away from zero).
  const shift = scale + exponent - frac.length;
  const keep = digits.length + Math.min(shift, 0);
  let units = keep > 0 ? BigInt(digits.slice(0, keep)) : 0n;
  if (units > 0n && shift > 0) {
    if (shift > 40) return null;
    units *= 10n ** BigInt(shift);
  }
  if (keep >= 0 && keep < digits.length && digits[keep] >= "5") units += 1n;
  if (sign === "-") units = -units;
  return units >= -LIMIT && units < LIMIT ? units : null; // a BigInt: cents may pass 2^53
}

function getAmountCents(event) {
  const v = get(event, "amount");
  let text;
  if (typeof v === "number") text = String(v); // shortest text of the double, like serde_json
  else if (isRaw(v)) text = v.rawJSON;
  else if (typeof v === "string") text = trim(v);
  else throw wrongType("amount", "a number or a numeric string", v);
  const cents = fixedPoint(text, 2);
  if (cents === null) {
    throw schema(`field /amount: ${JSON.stringify(text)} is not a decimal number that fits in 64 bits at scale 2`);
  }
  return cents;
}

// ---- timestamps: UTC milliseconds, years 0000-9999 ----------------------------------------

const MS_PER_DAY = 86_400_000;
const MIN_MS = -62_167_219_200_000;
const MAX_MS = 253_402_300_799_999;
const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))$/;

function daysFromCivil(y, m, d) {
  y -= m <= 2 ? 1 : 0;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const doy = Math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1;
  return era * 146_097 + yoe * 365 + Math.floor(yoe / 4) - Math.floor(yoe / 100) + doy - 719_468;
}

const daysInMonth = (y, m) =>
  m === 2 ? (y % 4 === 0 && (y % 100 !== 0 || y % 400 === 0) ? 29 : 28) : [4, 6, 9, 11].includes(m) ? 30 : 31;

function parseRfc3339(text) {
  const m = RFC3339.exec(text);
  const bad = (why) => schema(`field /ts: ${JSON.stringify(text)} is not an RFC 3339 timestamp: ${why}`);
  if (!m) throw bad("malformed");
  const [y, mo, d, h, mi, s] = m.slice(1, 7).map(Number);
  const ms = Number(((m[7] ?? "") + "000").slice(0, 3)); // truncated, never rounded
  let offset = 0;
  if (m[8]) {
    const [oh, om] = [Number(m[9]), Number(m[10])];
    if (oh > 23 || om > 59) throw bad("UTC offset out of range");
    offset = (oh * 60 + om) * (m[8] === "-" ? -1 : 1);
  }
  if (mo < 1 || mo > 12 || d < 1 || d > daysInMonth(y, mo)) throw bad("date out of range");
  if (h > 23 || mi > 59 || s > 59) throw bad("time of day out of range");
  return daysFromCivil(y, mo, d) * MS_PER_DAY + ((h * 60 + mi) * 60 + s) * 1000 + ms - offset * 60_000;
}

function getTimestampMs(event) {
  const v = get(event, "ts");
  let ms;
  if (typeof v === "string") ms = parseRfc3339(v);
  else if (Number.isSafeInteger(v)) ms = v;
  else throw wrongType("ts", "RFC 3339 text or an integer epoch", v); // also 64-bit epochs: far out of range
  if (ms < MIN_MS || ms > MAX_MS) throw schema(`field /ts: epoch ${ms} ms is outside years 0000-9999`);
  return ms;
}

const pad = (n, width) => String(n).padStart(width, "0");

// `YYYY-MM-DDTHH:MM:SS.mmmZ` (Date covers years 0000-9999 exactly).
function formatRfc3339(ms) {
  const t = new Date(ms);
  const date = `${pad(t.getUTCFullYear(), 4)}-${pad(t.getUTCMonth() + 1, 2)}-${pad(t.getUTCDate(), 2)}`;
  const time = `${pad(t.getUTCHours(), 2)}:${pad(t.getUTCMinutes(), 2)}:${pad(t.getUTCSeconds(), 2)}`;
  return `${date}T${time}.${pad(t.getUTCMilliseconds(), 3)}Z`;
}

// ---- the transform ------------------------------------------------------------------------

function enrich(record) {
  const event = parseEvent(record.value);
  if (trim(getString(event, "id")) === "") throw schema("field /id is empty");
  const userId = get(event, "user_id");
  const isU64 = (Number.isSafeInteger(userId) && userId >= 0) || (isRaw(userId) && /^\d+$/.test(userId.rawJSON));
  if (!isU64) throw wrongType("user_id", "a non-negative integer", userId);
  const cents = getAmountCents(event);
  const currency = getString(event, "currency");
  if (!CURRENCY.test(currency)) {
    throw schema(`field /currency: expected a 3-letter uppercase code, found ${JSON.stringify(currency)}`);
  }
  if (config.allowlist.size > 0 && !config.allowlist.has(currency)) {
    throw new Reject("invalid", `currency ${currency} is not in the allowlist`);
  }
  const ts = formatRfc3339(getTimestampMs(event));

  event.ts = ts;
  event.amount_cents = JSON.rawJSON(String(cents));
  event.amount_bucket = cents < 1_000n ? "small" : cents < 10_000n ? "medium" : "large";
  event.event_date = ts.slice(0, 10);
  event.source_partition = record.source.partition;
  event.source_offset = JSON.rawJSON(String(record.source.offset)); // an s64 arrives as a BigInt
  event.plugin_version = config.version;
  const routed = typeof event.kind === "string" ? config.routes.get(event.kind) : undefined;
  return [routed ?? config.table, JSON.stringify(event)];
}
