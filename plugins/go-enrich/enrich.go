// Package export_sluice_plugin_transform is the reference enrichment plugin in Go: the same
// behaviour as plugins/rust-enrich (see plugins/README.md). It implements the exported
// `transform` interface of the `sluice:plugin/plugin` world; build.sh generates the rest of
// the component's Go module with `wit-bindgen go`.
package export_sluice_plugin_transform

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	witTypes "go.bytecodealliance.org/pkg/wit/types"
	. "wit_component/sluice_plugin_types"
)

type settings struct {
	version   string
	table     witTypes.Option[string]
	allowlist map[string]bool
	routes    map[string]string
}

var config *settings

// Init parses and checks the stage config (same defaults and refusals as the Rust plugin).
func Init(raw string) witTypes.Result[witTypes.Unit, string] {
	// Automatic GC stays off outside `process` (see Process).
	debug.SetGCPercent(-1)
	c, err := parseConfig(raw)
	if err != nil {
		config = nil
		return witTypes.Err[witTypes.Unit](err.Error())
	}
	config = c
	return witTypes.Ok[witTypes.Unit, string](witTypes.Unit{})
}

func parseConfig(raw string) (*settings, error) {
	c := &settings{version: "v1", table: witTypes.None[string](), allowlist: map[string]bool{}}
	if strings.TrimSpace(raw) == "" {
		return c, nil
	}
	var fields map[string]json.RawMessage // `null` leaves it empty: the defaults
	if err := json.Unmarshal([]byte(raw), &fields); err != nil {
		return nil, fmt.Errorf("invalid config: %v", err)
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var allowlist []string
	for _, key := range keys {
		value := fields[key]
		var err error
		switch key {
		case "version":
			err = notNull(value, &c.version)
		case "table":
			if string(value) != "null" {
				var t string
				err = notNull(value, &t)
				c.table = witTypes.Some(t)
			}
		case "currency_allowlist":
			err = notNull(value, &allowlist)
		case "route_by_kind":
			err = notNull(value, &c.routes)
		default:
			err = errors.New("unknown field")
		}
		if err != nil {
			return nil, fmt.Errorf("invalid config: `%s`: %v", key, err)
		}
	}
	if strings.TrimSpace(c.version) == "" {
		return nil, errors.New("config: `version` must not be empty")
	}
	if c.table.IsSome() && strings.TrimSpace(c.table.Some()) == "" {
		return nil, errors.New("config: `table` must not be empty (use null for the default table)")
	}
	for _, code := range allowlist {
		if !isCurrencyCode(code) {
			return nil, fmt.Errorf("config: `currency_allowlist` entry %q is not a 3-letter uppercase code", code)
		}
		c.allowlist[code] = true
	}
	return c, nil
}

func notNull(raw json.RawMessage, into any) error {
	if string(raw) == "null" {
		return errors.New("must not be null")
	}
	return json.Unmarshal(raw, into)
}

// Process enriches every record of the batch; a bad record becomes a record-error.
func Process(batch []InputRecord) BatchResult {
	// Go's collector reads clocks and polls timers, which the component model forbids while
	// the host is allocating guest memory to pass arguments in (wasmtime issue 14318). So it
	// runs only inside `process`: turning it off again waits for a cycle in progress to end.
	debug.SetGCPercent(100)
	defer debug.SetGCPercent(-1)
	if config == nil {
		panic("process called before a successful init")
	}
	result := BatchResult{Outputs: make([]OutputRecord, 0, len(batch))}
	for i, record := range batch {
		table, row, err := enrich(config, record)
		if err != nil {
			result.Errors = append(result.Errors, RecordError{Input: uint32(i), Kind: err.kind, Message: err.message})
			continue
		}
		result.Outputs = append(result.Outputs, OutputRecord{
			Input: uint32(i), Table: table, Key: witTypes.None[[]uint8](), Value: row,
		})
	}
	return result
}

type recordError struct {
	kind    ErrorKind
	message string
}

func reject(kind ErrorKind, format string, args ...any) *recordError {
	return &recordError{kind, fmt.Sprintf(format, args...)}
}

func enrich(c *settings, record InputRecord) (witTypes.Option[string], []byte, *recordError) {
	none := witTypes.None[string]()
	event, err := parseEvent(record.Value)
	if err != nil {
		return none, nil, reject(ErrorKind_Parse, "payload is not valid JSON: %v", err)
	}
	id, rerr := getString(event, "id")
	if rerr == nil && strings.TrimSpace(id) == "" {
		rerr = reject(ErrorKind_Schema, "field /id is empty")
	}
	if rerr == nil {
		rerr = checkUserID(event)
	}
	var cents int64
	if rerr == nil {
		cents, rerr = getAmountCents(event)
	}
	var currency string
	if rerr == nil {
		currency, rerr = getString(event, "currency")
	}
	if rerr == nil && !isCurrencyCode(currency) {
		rerr = reject(ErrorKind_Schema, "field /currency: expected a 3-letter uppercase code, found %q", currency)
	}
	if rerr == nil && len(c.allowlist) > 0 && !c.allowlist[currency] {
		rerr = reject(ErrorKind_Invalid, "currency %s is not in the allowlist", currency)
	}
	var ts int64
	if rerr == nil {
		ts, rerr = getTimestampMs(event)
	}
	if rerr != nil {
		return none, nil, rerr
	}

	row := event.(map[string]any) // the getters above succeeded, so it is an object
	tsText := formatRFC3339(ts)
	row["ts"] = tsText
	row["amount_cents"] = cents
	row["amount_bucket"] = amountBucket(cents)
	row["event_date"] = tsText[:10]
	row["source_partition"] = record.Source.Partition
	row["source_offset"] = record.Source.Offset
	row["plugin_version"] = c.version

	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(row); err != nil {
		return none, nil, reject(ErrorKind_Other, "cannot encode the row: %v", err)
	}
	table := c.table
	if kind, ok := row["kind"].(string); ok {
		if t, ok := c.routes[kind]; ok {
			table = witTypes.Some(t)
		}
	}
	return table, bytes.TrimRight(out.Bytes(), "\n"), nil
}

// parseEvent decodes JSON like serde_json does: numbers keep their text (json.Number), and
// what encoding/json would quietly accept or repair is refused (bad UTF-8, lone surrogate
// escapes, numbers beyond the float range, trailing data).
func parseEvent(value []byte) (any, error) {
	if !utf8.Valid(value) {
		return nil, errors.New("not UTF-8")
	}
	if bytes.Contains(value, []byte(`\u`)) && hasLoneSurrogate(value) {
		return nil, errors.New("lone surrogate escape")
	}
	if bytes.Count(value, []byte("["))+bytes.Count(value, []byte("{")) >= 128 && tooDeep(value) {
		return nil, errors.New("recursion limit exceeded")
	}
	dec := json.NewDecoder(bytes.NewReader(value))
	dec.UseNumber()
	var event any
	if err := dec.Decode(&event); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing characters")
	}
	return event, checkNumbers(event)
}

// tooDeep tells whether arrays and objects nest more than 127 deep, which serde_json refuses.
func tooDeep(b []byte) bool {
	depth, inString := 0, false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case inString && c == '\\':
			i++
		case c == '"':
			inString = !inString
		case inString:
		case c == '[' || c == '{':
			if depth++; depth >= 128 {
				return true
			}
		case c == ']' || c == '}':
			depth--
		}
	}
	return false
}

func hasLoneSurrogate(b []byte) bool {
	for i := 0; i+1 < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		i++ // the escaped character
		if b[i] != 'u' || i+5 > len(b) {
			continue
		}
		u, err := strconv.ParseUint(string(b[i+1:i+5]), 16, 16)
		i += 4
		switch {
		case err != nil || u < 0xd800 || u > 0xdfff:
		case u >= 0xdc00:
			return true
		case i+7 > len(b) || b[i+1] != '\\' || b[i+2] != 'u':
			return true
		default:
			low, err := strconv.ParseUint(string(b[i+3:i+7]), 16, 16)
			if err != nil || low < 0xdc00 || low > 0xdfff {
				return true
			}
			i += 6
		}
	}
	return false
}

func checkNumbers(v any) error {
	switch v := v.(type) {
	case json.Number:
		if _, err := strconv.ParseFloat(string(v), 64); err != nil {
			return fmt.Errorf("number %s out of range", v)
		}
	case map[string]any:
		for _, e := range v {
			if err := checkNumbers(e); err != nil {
				return err
			}
		}
	case []any:
		for _, e := range v {
			if err := checkNumbers(e); err != nil {
				return err
			}
		}
	}
	return nil
}

func typeName(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case json.Number:
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	default:
		return "object"
	}
}

func get(event any, field string) (any, *recordError) {
	object, _ := event.(map[string]any)
	v, ok := object[field]
	if !ok {
		return nil, reject(ErrorKind_Schema, "missing field /%s", field)
	}
	if v == nil {
		return nil, reject(ErrorKind_Schema, "field /%s is null", field)
	}
	return v, nil
}

func wrongType(field, expected string, v any) *recordError {
	return reject(ErrorKind_Schema, "field /%s: expected %s, found %s", field, expected, typeName(v))
}

func getString(event any, field string) (string, *recordError) {
	v, err := get(event, field)
	if err != nil {
		return "", err
	}
	s, ok := v.(string)
	if !ok {
		return "", wrongType(field, "a string", v)
	}
	return s, nil
}

func checkUserID(event any) *recordError {
	v, err := get(event, "user_id")
	if err != nil {
		return err
	}
	if n, ok := v.(json.Number); ok {
		if _, perr := strconv.ParseUint(string(n), 10, 64); perr == nil {
			return nil
		}
	}
	return wrongType("user_id", "a non-negative integer", v)
}

func isCurrencyCode(s string) bool {
	return len(s) == 3 && strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") == ""
}

func amountBucket(cents int64) string {
	switch {
	case cents < 1_000:
		return "small"
	case cents < 10_000:
		return "medium"
	default:
		return "large"
	}
}

// numberText is the text serde_json gives a number: integers that fit 64 bits as written,
// anything else as the shortest text of the nearest double.
func numberText(n json.Number) string {
	s := string(n)
	if s != "-0" && !strings.ContainsAny(s, ".eE") {
		if _, err := strconv.ParseInt(s, 10, 64); err == nil {
			return s
		}
		if _, err := strconv.ParseUint(s, 10, 64); err == nil {
			return s
		}
	}
	f, _ := strconv.ParseFloat(s, 64) // checkNumbers refused the ones out of range
	return strconv.FormatFloat(f, 'g', -1, 64)
}

func getAmountCents(event any) (int64, *recordError) {
	v, err := get(event, "amount")
	if err != nil {
		return 0, err
	}
	var text string
	switch v := v.(type) {
	case json.Number:
		text = numberText(v)
	case string:
		text = strings.TrimSpace(v)
	default:
		return 0, wrongType("amount", "a number or a numeric string", v)
	}
	cents, ok := fixedPoint(text, 2)
	if !ok {
		return 0, reject(ErrorKind_Schema, "field /amount: %q is not a decimal number that fits in 64 bits at scale 2", text)
	}
	return cents, nil
}

// fixedPoint parses `[+-]digits[.digits][(e|E)[+-]digits]` exactly into 10^-scale units,
// rounding half away from zero.
func fixedPoint(text string, scale int64) (int64, bool) {
	rest, negative := text, false
	if rest != "" && (rest[0] == '-' || rest[0] == '+') {
		rest, negative = rest[1:], rest[0] == '-'
	}
	var exponent int64
	if i := strings.IndexAny(rest, "eE"); i >= 0 {
		e, err := strconv.ParseInt(rest[i+1:], 10, 32)
		if err != nil {
			return 0, false
		}
		rest, exponent = rest[:i], e
	}
	intPart, fracPart, _ := strings.Cut(rest, ".")
	digits := intPart + fracPart
	if digits == "" || strings.Trim(digits, "0123456789") != "" {
		return 0, false
	}
	// The value is digits * 10^shift units; with shift < 0 only the leading `keep` digits
	// count and the one after them decides the rounding.
	shift := scale + exponent - int64(len(fracPart))
	keep := int64(len(digits)) + min(shift, 0)
	const limit = uint64(1) << 63 // |i64::MIN|
	var units uint64
	for i := int64(0); i < keep; i++ {
		d := uint64(digits[i] - '0')
		if units > (limit-d)/10 {
			return 0, false
		}
		units = units*10 + d
	}
	for i := int64(0); units != 0 && i < shift; i++ {
		if units > limit/10 {
			return 0, false
		}
		units *= 10
	}
	if keep >= 0 && keep < int64(len(digits)) && digits[keep] >= '5' {
		units++
	}
	switch {
	case negative && units == limit:
		return -1 << 63, true
	case units >= limit:
		return 0, false
	case negative:
		return -int64(units), true
	}
	return int64(units), true
}

const (
	msPerDay = 86_400_000
	minMs    = -62_167_219_200_000 // 0000-01-01T00:00:00.000Z
	maxMs    = 253_402_300_799_999 // 9999-12-31T23:59:59.999Z
)

func getTimestampMs(event any) (int64, *recordError) {
	v, err := get(event, "ts")
	if err != nil {
		return 0, err
	}
	var ms int64
	switch v := v.(type) {
	case string:
		parsed, perr := parseRFC3339(v)
		if perr != nil {
			return 0, reject(ErrorKind_Schema, "field /ts: %q is not an RFC 3339 timestamp: %v", v, perr)
		}
		ms = parsed
	case json.Number:
		epoch, perr := strconv.ParseInt(string(v), 10, 64)
		if perr != nil || v == "-0" {
			return 0, wrongType("ts", "RFC 3339 text or an integer epoch", v)
		}
		ms = epoch
	default:
		return 0, wrongType("ts", "RFC 3339 text or an integer epoch", v)
	}
	if ms < minMs || ms > maxMs {
		return 0, reject(ErrorKind_Schema, "field /ts: epoch %d ms is outside years 0000-9999", ms)
	}
	return ms, nil
}

// parseRFC3339 reads `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)` into epoch milliseconds;
// digits past the millisecond are truncated.
func parseRFC3339(s string) (int64, error) {
	sc := scanner{s: s, ok: true}
	year := sc.digits(4)
	sc.oneOf("-")
	month := sc.digits(2)
	sc.oneOf("-")
	day := sc.digits(2)
	sc.oneOf("Tt ")
	hour := sc.digits(2)
	sc.oneOf(":")
	minute := sc.digits(2)
	sc.oneOf(":")
	second := sc.digits(2)
	var millis int64
	if sc.ok && sc.pos < len(s) && s[sc.pos] == '.' {
		sc.pos++
		start := sc.pos
		for sc.pos < len(s) && s[sc.pos] >= '0' && s[sc.pos] <= '9' {
			sc.pos++
		}
		if sc.pos == start {
			return 0, errors.New("expected digits after '.'")
		}
		millis, _ = strconv.ParseInt((s[start:sc.pos] + "00")[:3], 10, 64)
	}
	var offset int64
	if zone := sc.oneOf("Zz+-"); zone == '+' || zone == '-' {
		oh := sc.digits(2)
		sc.oneOf(":")
		om := sc.digits(2)
		if oh > 23 || om > 59 {
			return 0, errors.New("UTC offset out of range")
		}
		offset = oh*60 + om
		if zone == '-' {
			offset = -offset
		}
	}
	switch {
	case !sc.ok || sc.pos != len(s):
		return 0, errors.New("malformed")
	case month < 1 || month > 12:
		return 0, fmt.Errorf("month %d out of range", month)
	case day < 1 || day > daysInMonth(year, month):
		return 0, fmt.Errorf("day %d out of range for %04d-%02d", day, year, month)
	case hour > 23 || minute > 59:
		return 0, errors.New("time of day out of range")
	case second > 59:
		return 0, fmt.Errorf("second %d out of range", second)
	}
	local := daysFromCivil(year, month, day)*msPerDay + ((hour*60+minute)*60+second)*1000 + millis
	return local - offset*60_000, nil
}

type scanner struct {
	s   string
	pos int
	ok  bool
}

func (sc *scanner) digits(n int) int64 {
	if !sc.ok || sc.pos+n > len(sc.s) {
		sc.ok = false
		return 0
	}
	var v int64
	for _, c := range []byte(sc.s[sc.pos : sc.pos+n]) {
		if c < '0' || c > '9' {
			sc.ok = false
			return 0
		}
		v = v*10 + int64(c-'0')
	}
	sc.pos += n
	return v
}

func (sc *scanner) oneOf(allowed string) byte {
	if !sc.ok || sc.pos >= len(sc.s) || strings.IndexByte(allowed, sc.s[sc.pos]) < 0 {
		sc.ok = false
		return 0
	}
	sc.pos++
	return sc.s[sc.pos-1]
}

func daysInMonth(year, month int64) int64 {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && a < 0 {
		q--
	}
	return q
}

// daysFromCivil and civilFromDays: Howard Hinnant's algorithms, proleptic Gregorian.
func daysFromCivil(y, m, d int64) int64 {
	if m <= 2 {
		y--
	}
	era := floorDiv(y, 400)
	yoe := y - era*400
	doy := (153*((m+9)%12)+2)/5 + d - 1
	return era*146_097 + yoe*365 + yoe/4 - yoe/100 + doy - 719_468
}

func civilFromDays(days int64) (int64, int64, int64) {
	z := days + 719_468
	era := floorDiv(z, 146_097)
	doe := z - era*146_097
	yoe := (doe - doe/1460 + doe/36_524 - doe/146_096) / 365
	doy := doe - (365*yoe + yoe/4 - yoe/100)
	mp := (5*doy + 2) / 153
	d := doy - (153*mp+2)/5 + 1
	m := mp + 3
	if mp >= 10 {
		m = mp - 9
	}
	y := yoe + era*400
	if m <= 2 {
		y++
	}
	return y, m, d
}

// formatRFC3339 writes `YYYY-MM-DDTHH:MM:SS.mmmZ`.
func formatRFC3339(ms int64) string {
	days := floorDiv(ms, msPerDay)
	t := ms - days*msPerDay
	y, m, d := civilFromDays(days)
	return fmt.Sprintf("%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", y, m, d, t/3_600_000, t/60_000%60, t/1000%60, t%1000)
}
