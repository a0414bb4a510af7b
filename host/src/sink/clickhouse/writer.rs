//! The idempotent batch writer.
//!
//! Each batch covers a fixed offset range of one source partition (fixed in the journal before
//! the insert). Its rows go to ClickHouse with `insert_deduplication_token` =
//! `sluice:<pipeline>:<topic>:<partition>:<first>-<last>:<table>`, so a batch re-sent after a
//! crash is recognised and dropped by ClickHouse (MergeTree tables need
//! `non_replicated_deduplication_window` > 0 for that; `validate` warns when it is 0).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;

use super::encode::{JsonRowError, RowEncoder};
use super::types::{SchemaError, TableSchema};
use crate::config::{ClickHouseConfig, UnknownFieldsPolicy};
use crate::record::{DeadLetter, Record};

/// Name of the pseudo-stage that dead-letters rows the table does not accept.
pub const SINK_STAGE: &str = "sink";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("clickhouse {url}: {message}")]
    Connect { url: String, message: String },
    #[error("clickhouse table {database}.{table} does not exist")]
    MissingTable { database: String, table: String },
    #[error("clickhouse table {database}.{table}: {message}")]
    Schema {
        database: String,
        table: String,
        message: String,
    },
    #[error("insert into {table} failed ({}): {message}", if *.retryable { "retryable" } else { "fatal" })]
    Insert {
        table: String,
        retryable: bool,
        message: String,
    },
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SinkError::Insert {
                retryable: true,
                ..
            } | SinkError::Connect { .. }
        )
    }
}

/// A table the sink writes to: its insertable columns and the encoder built from them.
pub struct TableWriter {
    pub schema: TableSchema,
    encoder: RowEncoder,
    insert_sql: String,
}

/// At most this much is reserved up front for a batch's encoded rows of one table.
const RESERVE_CAP: usize = 64 << 20;

/// Rows of one batch encoded for one table.
#[derive(Debug, Default)]
pub struct EncodedTable {
    pub data: Vec<u8>,
    pub rows: usize,
}

pub struct ClickHouseSink {
    client: clickhouse::Client,
    url: String,
    database: String,
    default_table: String,
    tables: HashMap<String, TableWriter>,
}

impl ClickHouseSink {
    pub fn client(cfg: &ClickHouseConfig) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&cfg.url)
            .with_user(&cfg.user)
            .with_password(&cfg.password)
            .with_database(&cfg.database)
    }

    /// Connects and reads the schema of every table the pipeline may write to.
    pub async fn connect(cfg: &ClickHouseConfig) -> Result<Self, SinkError> {
        let client = Self::client(cfg);
        client
            .query("SELECT 1")
            .execute()
            .await
            .map_err(|e| SinkError::Connect {
                url: cfg.url.clone(),
                message: e.to_string(),
            })?;
        let mut schemas = Vec::new();
        for t in std::iter::once(&cfg.table).chain(cfg.extra_tables.iter()) {
            schemas.push(load_schema(&client, &cfg.database, t).await?);
        }
        Ok(Self::with_schemas(client, cfg, schemas))
    }

    /// A sink for tables whose schemas are known (the first is `cfg.table`'s).
    pub fn with_schemas(
        client: clickhouse::Client,
        cfg: &ClickHouseConfig,
        schemas: Vec<TableSchema>,
    ) -> Self {
        let tables = schemas
            .into_iter()
            .map(|schema| {
                let encoder = RowEncoder::new(&schema, unknown_policy(cfg.unknown_fields));
                // Built from the same schema as the encoder, so column order matches byte layout.
                let insert_sql = schema.insert_sql();
                let writer = TableWriter {
                    schema,
                    encoder,
                    insert_sql,
                };
                (writer.schema.table.clone(), writer)
            })
            .collect();
        Self {
            client,
            url: cfg.url.clone(),
            database: cfg.database.clone(),
            default_table: cfg.table.clone(),
            tables,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Encodes records per destination table. Rows the table cannot take become dead letters;
    /// the rest of the batch proceeds.
    pub fn encode(
        &self,
        records: Vec<Record>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> BTreeMap<String, EncodedTable> {
        let mut out = BTreeMap::new();
        let total = records.len();
        self.encode_into(records, dead_letters, &mut out, total);
        out
    }

    /// [`Self::encode`] appending to `out`, for a batch encoded in slices; `remaining`: the
    /// batch's records not encoded yet, these included (sizes each table's buffer once).
    pub fn encode_into(
        &self,
        records: Vec<Record>,
        dead_letters: &mut Vec<DeadLetter>,
        out: &mut BTreeMap<String, EncodedTable>,
        remaining: usize,
    ) {
        for (n, r) in records.into_iter().enumerate() {
            let table = r.table.as_deref().unwrap_or(&self.default_table);
            let reject = |kind: &str, message: String| DeadLetter {
                origin: r.origin.clone(),
                stage: SINK_STAGE.to_string(),
                plugin: None,
                kind: kind.to_string(),
                message,
            };
            let Some(writer) = self.tables.get(table) else {
                dead_letters.push(reject(
                    "unknown_table",
                    format!("table {table:?} is not one of the pipeline's sink tables (sink.clickhouse.table / extra_tables)"),
                ));
                continue;
            };
            if !out.contains_key(table) {
                out.insert(table.to_string(), EncodedTable::default());
            }
            let Some(enc) = out.get_mut(table) else {
                continue;
            };
            // Straight from the JSON bytes to RowBinary, without a `Value` tree.
            match writer.encoder.encode_json(&r.value, &mut enc.data) {
                Ok(()) => {
                    enc.rows += 1;
                    // Size the buffer once from the first row rather than doubling it (and
                    // copying it) ~20 times on the way to a batch's megabytes; capped, in case
                    // the first row is unusually large.
                    if enc.rows == 1 {
                        let guess = enc
                            .data
                            .len()
                            .saturating_mul(remaining.saturating_sub(n + 1));
                        enc.data.reserve(guess.min(RESERVE_CAP));
                    }
                }
                Err(JsonRowError::Syntax(e)) => dead_letters.push(reject(
                    "parse",
                    format!("row for table {table} is not valid JSON: {e}"),
                )),
                Err(JsonRowError::NotAnObject(kind)) => dead_letters.push(reject(
                    "schema",
                    format!("row for table {table} is a JSON {kind}, not an object"),
                )),
                Err(JsonRowError::Encode(e)) => {
                    dead_letters.push(reject("schema", format!("table {table}: {e}")))
                }
            }
        }
        out.retain(|_, e| e.rows > 0);
    }

    /// Inserts one encoded batch with its deduplication token. Not retried here: the engine
    /// decides (retryable errors back off and retry with the same token).
    pub async fn insert(&self, table: &str, data: Bytes, token: &str) -> Result<(), SinkError> {
        let Some(writer) = self.tables.get(table) else {
            return Err(SinkError::Insert {
                table: table.to_string(),
                retryable: false,
                message: "unknown table".into(),
            });
        };
        let mut insert = self
            .client
            .insert_formatted_with(writer.insert_sql.clone())
            .with_setting("insert_deduplication_token", token)
            // Synchronous inserts: the batch is already large, and the token must apply to it
            // as one unit (async inserts would merge it with others).
            .with_setting("async_insert", "0")
            .with_setting("insert_deduplicate", "1")
            .with_timeouts(
                Some(Duration::from_secs(60)),
                Some(Duration::from_secs(120)),
            );
        let res = match insert.send(data).await {
            Ok(()) => insert.end().await,
            Err(e) => Err(e),
        };
        res.map_err(|e| classify(table, e))
    }

    pub fn tables(&self) -> impl Iterator<Item = (&String, &TableWriter)> {
        self.tables.iter()
    }

    pub fn database(&self) -> &str {
        &self.database
    }
}

fn unknown_policy(p: UnknownFieldsPolicy) -> super::encode::UnknownFields {
    match p {
        UnknownFieldsPolicy::Ignore => super::encode::UnknownFields::Ignore,
        UnknownFieldsPolicy::Reject => super::encode::UnknownFields::Reject,
    }
}

/// Reads a table's insertable columns from `system.columns`.
pub async fn load_schema(
    client: &clickhouse::Client,
    database: &str,
    table: &str,
) -> Result<TableSchema, SinkError> {
    TableSchema::fetch(client, database, table)
        .await
        .map_err(|e| match e {
            SchemaError::TableNotFound { database, table } => {
                SinkError::MissingTable { database, table }
            }
            other => SinkError::Schema {
                database: database.to_string(),
                table: table.to_string(),
                message: other.to_string(),
            },
        })
}

/// ClickHouse error codes that mean "try again later" rather than "this insert is wrong".
const RETRYABLE_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    164, // READONLY
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    425, // SYSTEM_ERROR
    999, // KEEPER_EXCEPTION
];

fn classify(table: &str, e: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error as E;
    let message = e.to_string();
    let retryable = match &e {
        E::Network(_) | E::TimedOut => true,
        E::BadResponse(text) => server_code(text).is_none_or(|c| RETRYABLE_CODES.contains(&c)),
        _ => false,
    };
    SinkError::Insert {
        table: table.to_string(),
        retryable,
        message,
    }
}

/// Extracts `NNN` from ClickHouse's `Code: NNN. DB::Exception: ...`.
fn server_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The deduplication token of one batch's rows for one table.
pub fn dedup_token(
    pipeline: &str,
    topic: &str,
    partition: i32,
    first: i64,
    last: i64,
    table: &str,
) -> String {
    format!("sluice:{pipeline}:{topic}:{partition}:{first}-{last}:{table}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_code_is_parsed() {
        assert_eq!(
            server_code("Code: 252. DB::Exception: Too many parts"),
            Some(252)
        );
        assert_eq!(server_code("no code here"), None);
    }

    #[test]
    fn token_is_deterministic_and_distinct_per_table() {
        let a = dedup_token("p", "t", 0, 10, 20, "x");
        assert_eq!(a, dedup_token("p", "t", 0, 10, 20, "x"));
        assert_ne!(a, dedup_token("p", "t", 0, 10, 20, "y"));
        assert_ne!(a, dedup_token("p", "t", 1, 10, 20, "x"));
    }
}
