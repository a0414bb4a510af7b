//! ClickHouse column types as the sink sees them.
//!
//! A [`TableSchema`] is read once from `system.columns` (names, type strings and default kinds, in
//! table order) and turned into [`ColumnType`] trees that the encoder walks for every row. The type
//! strings are parsed here rather than with `clickhouse_types::DataTypeNode`, which drops the
//! element names of named tuples (`Tuple(a UInt8, b String)`) that JSON objects are matched by.
//!
//! Types that cannot be built from JSON values (aggregate states, `Dynamic`, `Variant`, `JSON`,
//! geo types, `Time`, intervals) make schema construction fail with a [`ColumnError`] naming the
//! column and the type, so a pipeline is rejected at validation time instead of per row.

use std::fmt;

/// A ClickHouse data type that the sink can write in RowBinary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    Int128,
    Int256,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    UInt128,
    UInt256,
    Float32,
    Float64,
    BFloat16,
    /// `Decimal(P, S)`; `Decimal32(S)` etc. are normalised to this form.
    Decimal {
        precision: u8,
        scale: u8,
    },
    String,
    FixedString(usize),
    Uuid,
    Date,
    Date32,
    /// The time zone only affects how ClickHouse displays the value; the stored value is UTC.
    DateTime {
        timezone: Option<String>,
    },
    DateTime64 {
        precision: u8,
        timezone: Option<String>,
    },
    Ipv4,
    Ipv6,
    /// Declared `(name, value)` pairs, in declaration order.
    Enum8(Vec<(String, i8)>),
    Enum16(Vec<(String, i16)>),
    Nullable(Box<ColumnType>),
    /// Same RowBinary bytes as the inner type.
    LowCardinality(Box<ColumnType>),
    Array(Box<ColumnType>),
    Map(Box<ColumnType>, Box<ColumnType>),
    Tuple(Vec<TupleElement>),
    /// `SimpleAggregateFunction(f, T)`: stored and sent as `T`.
    SimpleAggregateFunction {
        function: String,
        inner: Box<ColumnType>,
    },
}

/// One element of a `Tuple`; `name` is set for named tuples (`Tuple(a UInt8, b String)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleElement {
    pub name: Option<String>,
    pub ty: ColumnType,
}

/// Why a type string cannot be used by the sink.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("type {ty} is not supported: {reason}")]
    Unsupported { ty: String, reason: &'static str },
    #[error("cannot parse type {input:?} at byte {pos}: {message}")]
    Syntax {
        input: String,
        pos: usize,
        message: String,
    },
}

impl ColumnType {
    /// Parses a type string as ClickHouse prints it in `system.columns.type`.
    pub fn parse(input: &str) -> Result<Self, TypeError> {
        let mut p = Parser { s: input, pos: 0 };
        let ty = p.ty()?;
        p.ws();
        if p.pos != input.len() {
            return Err(p.syntax("unexpected text after the type"));
        }
        Ok(ty)
    }

    /// Whether a JSON `null` is stored as NULL (looking through `LowCardinality` and
    /// `SimpleAggregateFunction`, which do not change the bytes).
    pub fn is_nullable(&self) -> bool {
        match self {
            ColumnType::Nullable(_) => true,
            ColumnType::LowCardinality(inner)
            | ColumnType::SimpleAggregateFunction { inner, .. } => inner.is_nullable(),
            _ => false,
        }
    }
}

/// Writes the type the way ClickHouse spells it (used in error messages).
impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ColumnType as T;
        let simple = match self {
            T::Bool => "Bool",
            T::Int8 => "Int8",
            T::Int16 => "Int16",
            T::Int32 => "Int32",
            T::Int64 => "Int64",
            T::Int128 => "Int128",
            T::Int256 => "Int256",
            T::UInt8 => "UInt8",
            T::UInt16 => "UInt16",
            T::UInt32 => "UInt32",
            T::UInt64 => "UInt64",
            T::UInt128 => "UInt128",
            T::UInt256 => "UInt256",
            T::Float32 => "Float32",
            T::Float64 => "Float64",
            T::BFloat16 => "BFloat16",
            T::String => "String",
            T::Uuid => "UUID",
            T::Date => "Date",
            T::Date32 => "Date32",
            T::Ipv4 => "IPv4",
            T::Ipv6 => "IPv6",
            _ => "",
        };
        if !simple.is_empty() {
            return f.write_str(simple);
        }
        match self {
            T::Decimal { precision, scale } => write!(f, "Decimal({precision}, {scale})"),
            T::FixedString(n) => write!(f, "FixedString({n})"),
            T::DateTime { timezone: None } => f.write_str("DateTime"),
            T::DateTime { timezone: Some(tz) } => write!(f, "DateTime({})", Quoted(tz)),
            T::DateTime64 {
                precision,
                timezone: None,
            } => write!(f, "DateTime64({precision})"),
            T::DateTime64 {
                precision,
                timezone: Some(tz),
            } => write!(f, "DateTime64({precision}, {})", Quoted(tz)),
            T::Enum8(values) => {
                write_enum(f, "Enum8", values.iter().map(|(n, v)| (n, i16::from(*v))))
            }
            T::Enum16(values) => write_enum(f, "Enum16", values.iter().map(|(n, v)| (n, *v))),
            T::Nullable(inner) => write!(f, "Nullable({inner})"),
            T::LowCardinality(inner) => write!(f, "LowCardinality({inner})"),
            T::Array(inner) => write!(f, "Array({inner})"),
            T::Map(k, v) => write!(f, "Map({k}, {v})"),
            T::Tuple(elements) => {
                f.write_str("Tuple(")?;
                for (i, e) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if let Some(name) = &e.name {
                        write!(f, "{} ", Ident(name))?;
                    }
                    write!(f, "{}", e.ty)?;
                }
                f.write_str(")")
            }
            T::SimpleAggregateFunction { function, inner } => {
                write!(f, "SimpleAggregateFunction({function}, {inner})")
            }
            _ => Ok(()),
        }
    }
}

fn write_enum<'a>(
    f: &mut fmt::Formatter<'_>,
    kind: &str,
    values: impl Iterator<Item = (&'a String, i16)>,
) -> fmt::Result {
    write!(f, "{kind}(")?;
    for (i, (name, value)) in values.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{} = {value}", Quoted(name))?;
    }
    f.write_str(")")
}

/// A single-quoted ClickHouse string literal.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("'")?;
        for c in self.0.chars() {
            match c {
                '\'' => f.write_str("\\'")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("'")
    }
}

/// An identifier, backquoted unless it is a plain `[A-Za-z_][A-Za-z0-9_]*` name.
struct Ident<'a>(&'a str);

impl fmt::Display for Ident<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = self
            .0
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if plain {
            return f.write_str(self.0);
        }
        f.write_str("`")?;
        for c in self.0.chars() {
            match c {
                '`' => f.write_str("\\`")?,
                '\\' => f.write_str("\\\\")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("`")
    }
}

/// Quotes an identifier for use in SQL (always backquoted, so reserved words are safe too).
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// Recursive-descent parser over the canonical type strings of `system.columns`.
struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn syntax(&self, message: impl Into<String>) -> TypeError {
        TypeError::Syntax {
            input: self.s.to_owned(),
            pos: self.pos,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// Consumes `c` (after whitespace) if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), TypeError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.syntax(format!("expected '{}'", c as char)))
        }
    }

    fn ident(&mut self) -> Result<&'a str, TypeError> {
        self.ws();
        let start = self.pos;
        if self
            .peek()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        {
            while self
                .peek()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                self.pos += 1;
            }
        }
        if self.pos == start {
            return Err(self.syntax("expected a name"));
        }
        Ok(&self.s[start..self.pos])
    }

    /// A quoted string: `'...'` or `` `...` `` with backslash escapes (and doubled quotes).
    fn quoted(&mut self, quote: u8) -> Result<String, TypeError> {
        self.ws();
        if self.peek() != Some(quote) {
            return Err(self.syntax(format!("expected {}", quote as char)));
        }
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.syntax("unterminated quoted string"));
            };
            self.pos += 1;
            if b == quote {
                if self.peek() == Some(quote) {
                    out.push(quote);
                    self.pos += 1;
                    continue;
                }
                break;
            }
            if b != b'\\' {
                out.push(b);
                continue;
            }
            let Some(e) = self.peek() else {
                return Err(self.syntax("unterminated escape"));
            };
            self.pos += 1;
            match e {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'0' => out.push(0),
                b'a' => out.push(7),
                b'v' => out.push(11),
                b'x' => {
                    let hex = self
                        .s
                        .get(self.pos..self.pos + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| self.syntax("bad \\x escape"))?;
                    self.pos += 2;
                    out.push(hex);
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| self.syntax("quoted string is not UTF-8"))
    }

    fn int(&mut self) -> Result<i64, TypeError> {
        self.ws();
        let start = self.pos;
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.pos += 1;
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.s[start..self.pos]
            .parse()
            .map_err(|_| TypeError::Syntax {
                input: self.s.to_owned(),
                pos: start,
                message: "expected an integer".into(),
            })
    }

    fn small_int(&mut self, what: &str, max: i64) -> Result<u8, TypeError> {
        let v = self.int()?;
        if !(0..=max).contains(&v) {
            return Err(self.syntax(format!("{what} {v} is out of range 0..={max}")));
        }
        Ok(v as u8)
    }

    /// Skips a balanced `( ... )` group if one follows (quotes respected).
    fn skip_args(&mut self) -> Result<(), TypeError> {
        self.ws();
        if self.peek() != Some(b'(') {
            return Ok(());
        }
        let mut depth = 0usize;
        while let Some(b) = self.peek() {
            match b {
                b'\'' | b'`' | b'"' => {
                    self.quoted(b)?;
                    continue;
                }
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        self.pos += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
        Err(self.syntax("unbalanced parentheses"))
    }

    fn inner(&mut self) -> Result<Box<ColumnType>, TypeError> {
        self.expect(b'(')?;
        let t = self.ty()?;
        self.expect(b')')?;
        Ok(Box::new(t))
    }

    fn ty(&mut self) -> Result<ColumnType, TypeError> {
        use ColumnType as T;
        self.ws();
        let start = self.pos;
        let name = self.ident()?;
        let simple = match name {
            "Bool" => Some(T::Bool),
            "Int8" => Some(T::Int8),
            "Int16" => Some(T::Int16),
            "Int32" => Some(T::Int32),
            "Int64" => Some(T::Int64),
            "Int128" => Some(T::Int128),
            "Int256" => Some(T::Int256),
            "UInt8" => Some(T::UInt8),
            "UInt16" => Some(T::UInt16),
            "UInt32" => Some(T::UInt32),
            "UInt64" => Some(T::UInt64),
            "UInt128" => Some(T::UInt128),
            "UInt256" => Some(T::UInt256),
            "Float32" => Some(T::Float32),
            "Float64" => Some(T::Float64),
            "BFloat16" => Some(T::BFloat16),
            "String" => Some(T::String),
            "UUID" => Some(T::Uuid),
            "Date" => Some(T::Date),
            "Date32" => Some(T::Date32),
            "IPv4" => Some(T::Ipv4),
            "IPv6" => Some(T::Ipv6),
            _ => None,
        };
        if let Some(t) = simple {
            return Ok(t);
        }
        let ty = match name {
            "DateTime" => {
                let timezone = if self.eat(b'(') {
                    let tz = self.quoted(b'\'')?;
                    self.expect(b')')?;
                    Some(tz)
                } else {
                    None
                };
                T::DateTime { timezone }
            }
            "DateTime64" => {
                self.expect(b'(')?;
                let precision = self.small_int("DateTime64 precision", 9)?;
                let timezone = if self.eat(b',') {
                    Some(self.quoted(b'\'')?)
                } else {
                    None
                };
                self.expect(b')')?;
                T::DateTime64 {
                    precision,
                    timezone,
                }
            }
            "Decimal" => {
                self.expect(b'(')?;
                let precision = self.small_int("Decimal precision", 76)?;
                let scale = if self.eat(b',') {
                    self.small_int("Decimal scale", precision.into())?
                } else {
                    0
                };
                self.expect(b')')?;
                if precision == 0 {
                    return Err(self.syntax("Decimal precision must be at least 1"));
                }
                T::Decimal { precision, scale }
            }
            "Decimal32" | "Decimal64" | "Decimal128" | "Decimal256" => {
                let precision = match name {
                    "Decimal32" => 9,
                    "Decimal64" => 18,
                    "Decimal128" => 38,
                    _ => 76,
                };
                self.expect(b'(')?;
                let scale = self.small_int("Decimal scale", precision)?;
                self.expect(b')')?;
                T::Decimal {
                    precision: precision as u8,
                    scale,
                }
            }
            "FixedString" => {
                self.expect(b'(')?;
                let n = self.int()?;
                self.expect(b')')?;
                match usize::try_from(n) {
                    Ok(n) if n > 0 => T::FixedString(n),
                    _ => return Err(self.syntax("FixedString length must be positive")),
                }
            }
            "Enum8" => T::Enum8(
                self.enum_values()?
                    .into_iter()
                    .map(|(n, v)| i8::try_from(v).map(|v| (n, v)))
                    .collect::<Result<_, _>>()
                    .map_err(|_| self.syntax("Enum8 value out of range"))?,
            ),
            "Enum16" => T::Enum16(
                self.enum_values()?
                    .into_iter()
                    .map(|(n, v)| i16::try_from(v).map(|v| (n, v)))
                    .collect::<Result<_, _>>()
                    .map_err(|_| self.syntax("Enum16 value out of range"))?,
            ),
            "Nullable" => T::Nullable(self.inner()?),
            "LowCardinality" => T::LowCardinality(self.inner()?),
            "Array" => T::Array(self.inner()?),
            "Map" => {
                self.expect(b'(')?;
                let k = self.ty()?;
                self.expect(b',')?;
                let v = self.ty()?;
                self.expect(b')')?;
                T::Map(Box::new(k), Box::new(v))
            }
            "Tuple" => T::Tuple(self.tuple_elements()?),
            // With `flatten_nested = 0` a Nested column is sent as an array of named tuples.
            "Nested" => {
                let elements = self.tuple_elements()?;
                if elements.iter().any(|e| e.name.is_none()) {
                    return Err(self.syntax("Nested elements must be named"));
                }
                T::Array(Box::new(T::Tuple(elements)))
            }
            "SimpleAggregateFunction" => {
                self.expect(b'(')?;
                let fn_start = self.pos;
                self.ident()?;
                self.skip_args()?; // parametric functions, e.g. groupArrayArray(10)
                let function = self.s[fn_start..self.pos].trim().to_owned();
                self.expect(b',')?;
                let inner = self.ty()?;
                self.expect(b')')?;
                T::SimpleAggregateFunction {
                    function,
                    inner: Box::new(inner),
                }
            }
            _ => {
                let reason = unsupported_reason(name);
                self.skip_args()?;
                return Err(TypeError::Unsupported {
                    ty: self.s[start..self.pos].to_owned(),
                    reason,
                });
            }
        };
        Ok(ty)
    }

    fn enum_values(&mut self) -> Result<Vec<(String, i64)>, TypeError> {
        self.expect(b'(')?;
        let mut values = Vec::new();
        let mut next = 1i64;
        loop {
            let name = self.quoted(b'\'')?;
            // Explicit values are what system.columns prints; implicit ones count up from 1.
            let value = if self.eat(b'=') { self.int()? } else { next };
            next = value + 1;
            values.push((name, value));
            if self.eat(b')') {
                return Ok(values);
            }
            self.expect(b',')?;
        }
    }

    fn tuple_elements(&mut self) -> Result<Vec<TupleElement>, TypeError> {
        self.expect(b'(')?;
        let mut elements = Vec::new();
        loop {
            self.ws();
            let name = if self.peek() == Some(b'`') {
                Some(self.quoted(b'`')?)
            } else {
                // `a UInt8` (named) vs `UInt8` / `Array(UInt8)` (unnamed): a name is followed
                // by another word rather than by `(`, `,` or `)`.
                let save = self.pos;
                let word = self.ident()?;
                self.ws();
                if self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                {
                    Some(word.to_owned())
                } else {
                    self.pos = save;
                    None
                }
            };
            let ty = self.ty()?;
            elements.push(TupleElement { name, ty });
            if self.eat(b')') {
                break;
            }
            self.expect(b',')?;
        }
        let named = elements.iter().filter(|e| e.name.is_some()).count();
        if named != 0 && named != elements.len() {
            return Err(self.syntax("tuple mixes named and unnamed elements"));
        }
        Ok(elements)
    }
}

fn unsupported_reason(name: &str) -> &'static str {
    match name {
        "AggregateFunction" => {
            "aggregate states cannot be built from JSON; use SimpleAggregateFunction, or insert \
             plain values into another table and aggregate with a materialized view"
        }
        "Dynamic" | "Variant" | "JSON" | "Object" => {
            "dynamic and semi-structured types are not supported by the sink; use a String column \
             (objects are stored as JSON text) or typed columns"
        }
        "Point" | "Ring" | "LineString" | "MultiLineString" | "Polygon" | "MultiPolygon"
        | "Geometry" => "geo types are not supported by the sink; use Tuple/Array of Float64",
        "Nothing" => "a Nothing column cannot hold values",
        "Time" | "Time64" => "Time types are not supported by the sink yet",
        n if n.starts_with("Interval") => "interval types cannot be stored in tables",
        _ => "unknown type name",
    }
}

/// A column that can appear in an `INSERT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// The type exactly as `system.columns` printed it (for messages).
    pub type_name: String,
    /// The column has a `DEFAULT` expression (or is `EPHEMERAL`); without one, an absent value
    /// still gets the type's default (0, '', ...).
    pub has_default: bool,
}

/// The insertable columns of a table, in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub database: String,
    pub table: String,
    pub columns: Vec<Column>,
    /// `MATERIALIZED` and `ALIAS` columns: computed by ClickHouse, never sent.
    pub computed: Vec<String>,
}

/// One column the sink cannot write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ColumnError {
    #[error("column {column:?}: {source}")]
    Type {
        column: String,
        #[source]
        source: TypeError,
    },
    #[error("column {column:?} has an unknown default kind {kind:?}")]
    DefaultKind { column: String, kind: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {database}.{table} does not exist (no rows in system.columns)")]
    TableNotFound { database: String, table: String },
    #[error("table {database}.{table} has no insertable columns")]
    NoInsertableColumns { database: String, table: String },
    #[error("table {database}.{table} has columns the sink cannot write: {}", join(.errors))]
    Columns {
        database: String,
        table: String,
        errors: Vec<ColumnError>,
    },
    #[error("reading the columns of {database}.{table} from system.columns: {source}")]
    Query {
        database: String,
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
}

fn join(errors: &[ColumnError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl TableSchema {
    /// The query whose rows [`TableSchema::from_columns`] takes (bind database, then table).
    pub const COLUMNS_QUERY: &'static str = "SELECT name, type, default_kind FROM system.columns \
         WHERE database = ? AND table = ? ORDER BY position";

    /// Builds the schema from `(name, type, default_kind)` rows of [`Self::COLUMNS_QUERY`].
    ///
    /// `MATERIALIZED` and `ALIAS` columns are left out (ClickHouse computes them and rejects
    /// them in an insert). `EPHEMERAL` columns are kept: they exist to be inserted (feeding
    /// other columns' `DEFAULT` expressions) and accept RowBinaryWithDefaults (checked on
    /// ClickHouse 26.9). Every unsupported column is reported, not just the first.
    pub fn from_columns<N, T, K>(
        database: impl Into<String>,
        table: impl Into<String>,
        rows: impl IntoIterator<Item = (N, T, K)>,
    ) -> Result<Self, SchemaError>
    where
        N: Into<String>,
        T: AsRef<str>,
        K: AsRef<str>,
    {
        let database = database.into();
        let table = table.into();
        let mut columns = Vec::new();
        let mut computed = Vec::new();
        let mut errors = Vec::new();
        let mut seen = 0usize;
        for (name, type_name, kind) in rows {
            seen += 1;
            let name = name.into();
            let has_default = match kind.as_ref() {
                "" => false,
                "DEFAULT" | "EPHEMERAL" => true,
                "MATERIALIZED" | "ALIAS" => {
                    computed.push(name);
                    continue;
                }
                other => {
                    errors.push(ColumnError::DefaultKind {
                        column: name,
                        kind: other.to_owned(),
                    });
                    continue;
                }
            };
            match ColumnType::parse(type_name.as_ref()) {
                Ok(ty) => columns.push(Column {
                    name,
                    ty,
                    type_name: type_name.as_ref().to_owned(),
                    has_default,
                }),
                Err(source) => errors.push(ColumnError::Type {
                    column: name,
                    source,
                }),
            }
        }
        if seen == 0 {
            return Err(SchemaError::TableNotFound { database, table });
        }
        if !errors.is_empty() {
            return Err(SchemaError::Columns {
                database,
                table,
                errors,
            });
        }
        if columns.is_empty() {
            return Err(SchemaError::NoInsertableColumns { database, table });
        }
        Ok(Self {
            database,
            table,
            columns,
            computed,
        })
    }

    /// Reads the schema from `system.columns`.
    pub async fn fetch(
        client: &clickhouse::Client,
        database: &str,
        table: &str,
    ) -> Result<Self, SchemaError> {
        let rows = client
            .query(Self::COLUMNS_QUERY)
            .bind(database)
            .bind(table)
            .fetch_all::<(String, String, String)>()
            .await
            .map_err(|source| SchemaError::Query {
                database: database.to_owned(),
                table: table.to_owned(),
                source,
            })?;
        Self::from_columns(database, table, rows)
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// `` `db`.`table` `` for SQL.
    pub fn qualified_name(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.database),
            quote_ident(&self.table)
        )
    }

    /// The statement that matches the byte layout of [`super::encode::RowEncoder`]: every
    /// insertable column, in table order.
    pub fn insert_sql(&self) -> String {
        let cols: Vec<String> = self.columns.iter().map(|c| quote_ident(&c.name)).collect();
        format!(
            "INSERT INTO {} ({}) FORMAT RowBinaryWithDefaults",
            self.qualified_name(),
            cols.join(", ")
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;
    use ColumnType as T;

    fn parse(s: &str) -> ColumnType {
        ColumnType::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn simple_types() {
        for (s, t) in [
            ("Bool", T::Bool),
            ("Int8", T::Int8),
            ("Int256", T::Int256),
            ("UInt64", T::UInt64),
            ("UInt256", T::UInt256),
            ("Float32", T::Float32),
            ("BFloat16", T::BFloat16),
            ("String", T::String),
            ("UUID", T::Uuid),
            ("Date32", T::Date32),
            ("IPv4", T::Ipv4),
            ("IPv6", T::Ipv6),
        ] {
            assert_eq!(parse(s), t);
            assert_eq!(t.to_string(), s);
        }
    }

    #[test]
    fn parametric_types() {
        assert_eq!(
            parse("Decimal(9, 3)"),
            T::Decimal {
                precision: 9,
                scale: 3
            }
        );
        assert_eq!(
            parse("Decimal128(4)"),
            T::Decimal {
                precision: 38,
                scale: 4
            }
        );
        assert_eq!(
            parse("Decimal(5)"),
            T::Decimal {
                precision: 5,
                scale: 0
            }
        );
        assert_eq!(parse("FixedString(16)"), T::FixedString(16));
        assert_eq!(parse("DateTime"), T::DateTime { timezone: None });
        assert_eq!(
            parse("DateTime('Europe/Berlin')"),
            T::DateTime {
                timezone: Some("Europe/Berlin".into())
            }
        );
        let t = parse("DateTime64(6, 'UTC')");
        assert_eq!(
            t,
            T::DateTime64 {
                precision: 6,
                timezone: Some("UTC".into())
            }
        );
        assert_eq!(t.to_string(), "DateTime64(6, 'UTC')");
        assert_eq!(
            parse("DateTime64(3)"),
            T::DateTime64 {
                precision: 3,
                timezone: None
            }
        );
    }

    #[test]
    fn enums_with_escapes() {
        // Exactly as system.columns prints them.
        let t = parse(r"Enum8('c\\d' = -2, 'a\'b' = 1, 'é' = 3)");
        assert_eq!(
            t,
            T::Enum8(vec![
                ("c\\d".into(), -2),
                ("a'b".into(), 1),
                ("é".into(), 3)
            ])
        );
        assert_eq!(t.to_string(), r"Enum8('c\\d' = -2, 'a\'b' = 1, 'é' = 3)");
        assert_eq!(
            parse("Enum16('x' = 1000, 'y' = -1000)"),
            T::Enum16(vec![("x".into(), 1000), ("y".into(), -1000)])
        );
        assert_eq!(
            parse("Enum8('a', 'b')"),
            T::Enum8(vec![("a".into(), 1), ("b".into(), 2)])
        );
        assert!(ColumnType::parse("Enum8('a' = 200)").is_err());
    }

    #[test]
    fn containers() {
        let t = parse("Map(LowCardinality(String), Array(Tuple(UInt8, Nullable(String))))");
        assert_eq!(
            t,
            T::Map(
                Box::new(T::LowCardinality(Box::new(T::String))),
                Box::new(T::Array(Box::new(T::Tuple(vec![
                    TupleElement {
                        name: None,
                        ty: T::UInt8
                    },
                    TupleElement {
                        name: None,
                        ty: T::Nullable(Box::new(T::String))
                    },
                ]))))
            )
        );
        assert_eq!(
            t.to_string(),
            "Map(LowCardinality(String), Array(Tuple(UInt8, Nullable(String))))"
        );
        assert!(parse("LowCardinality(Nullable(String))").is_nullable());
        assert!(!parse("Array(Nullable(String))").is_nullable());
    }

    #[test]
    fn named_tuples_keep_names() {
        let t = parse("Tuple(x UInt8, `y z` String, `1` Array(Int8), n Nullable(UInt8))");
        let T::Tuple(elements) = &t else {
            panic!("not a tuple: {t:?}")
        };
        let names: Vec<_> = elements.iter().map(|e| e.name.as_deref()).collect();
        assert_eq!(names, [Some("x"), Some("y z"), Some("1"), Some("n")]);
        assert_eq!(elements[2].ty, T::Array(Box::new(T::Int8)));
        assert_eq!(
            t.to_string(),
            "Tuple(x UInt8, `y z` String, `1` Array(Int8), n Nullable(UInt8))"
        );
        // Nested (flatten_nested = 0) is an array of named tuples.
        assert_eq!(
            parse("Nested(a UInt8, b String)"),
            T::Array(Box::new(T::Tuple(vec![
                TupleElement {
                    name: Some("a".into()),
                    ty: T::UInt8
                },
                TupleElement {
                    name: Some("b".into()),
                    ty: T::String
                },
            ])))
        );
    }

    #[test]
    fn simple_aggregate_function() {
        let t = parse("SimpleAggregateFunction(anyLast, Nullable(UInt8))");
        assert!(t.is_nullable());
        assert_eq!(
            parse("SimpleAggregateFunction(groupArrayArray(10), Array(UInt8))"),
            T::SimpleAggregateFunction {
                function: "groupArrayArray(10)".into(),
                inner: Box::new(T::Array(Box::new(T::UInt8)))
            }
        );
    }

    #[test]
    fn unsupported_types_are_named() {
        for s in [
            "AggregateFunction(uniq, UInt64)",
            "Dynamic",
            "Variant(String, UInt64)",
            "JSON",
            "Object('json')",
            "Point",
            "MultiPolygon",
            "Time",
            "IntervalSecond",
            "Nothing",
            "Frobnicate(1)",
        ] {
            match ColumnType::parse(s) {
                Err(TypeError::Unsupported { ty, .. }) => assert_eq!(ty, s),
                other => panic!("{s}: {other:?}"),
            }
        }
        // Nested inside a container: the inner type is named.
        match ColumnType::parse("Array(Tuple(UInt8, AggregateFunction(sum, UInt64)))") {
            Err(TypeError::Unsupported { ty, .. }) => {
                assert_eq!(ty, "AggregateFunction(sum, UInt64)")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_errors() {
        for s in [
            "",
            "Array(",
            "Array(UInt8",
            "Decimal(80, 2)",
            "Decimal(5, 6)",
            "DateTime64(10)",
            "FixedString(0)",
            "Map(String)",
            "UInt8 extra",
            "Tuple(a UInt8, String)",
        ] {
            assert!(
                matches!(ColumnType::parse(s), Err(TypeError::Syntax { .. })),
                "{s}: {:?}",
                ColumnType::parse(s)
            );
        }
    }

    #[test]
    fn schema_from_system_columns() {
        let schema = TableSchema::from_columns(
            "db",
            "t",
            [
                ("id", "UInt64", ""),
                ("ts", "DateTime64(3, 'UTC')", "DEFAULT"),
                ("raw", "String", "EPHEMERAL"),
                ("m", "String", "MATERIALIZED"),
                ("a", "String", "ALIAS"),
            ],
        )
        .unwrap();
        let names: Vec<_> = schema.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "ts", "raw"]);
        assert_eq!(schema.computed, ["m", "a"]);
        assert!(!schema.columns[0].has_default);
        assert!(schema.columns[1].has_default);
        assert_eq!(schema.columns[1].type_name, "DateTime64(3, 'UTC')");
        assert_eq!(
            schema.insert_sql(),
            "INSERT INTO `db`.`t` (`id`, `ts`, `raw`) FORMAT RowBinaryWithDefaults"
        );
        assert_eq!(quote_ident("a`b\\c"), "`a\\`b\\\\c`");
    }

    #[test]
    fn schema_reports_every_unsupported_column() {
        let err = TableSchema::from_columns(
            "db",
            "t",
            [
                ("ok", "UInt8", ""),
                ("agg", "AggregateFunction(uniq, UInt64)", ""),
                ("dyn", "Dynamic", "DEFAULT"),
                ("weird", "UInt8", "SOMETHING"),
            ],
        )
        .unwrap_err();
        let SchemaError::Columns { errors, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(errors.len(), 3);
        let msg = err.to_string();
        assert!(msg.contains("column \"agg\""), "{msg}");
        assert!(msg.contains("AggregateFunction(uniq, UInt64)"), "{msg}");
        assert!(msg.contains("column \"dyn\": type Dynamic"), "{msg}");
        assert!(msg.contains("\"SOMETHING\""), "{msg}");
    }

    #[test]
    fn schema_of_missing_or_computed_only_table() {
        let rows: [(&str, &str, &str); 0] = [];
        assert!(matches!(
            TableSchema::from_columns("db", "t", rows),
            Err(SchemaError::TableNotFound { .. })
        ));
        assert!(matches!(
            TableSchema::from_columns("db", "t", [("m", "UInt8", "MATERIALIZED")]),
            Err(SchemaError::NoInsertableColumns { .. })
        ));
    }
}
