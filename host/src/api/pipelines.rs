//! `/v1/pipelines`: status, pause/resume, hot-swap, rollback, shadow runs, dead letters.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::Shared;
use crate::pipeline::control::{PipelineStatus, SwapOutcome};
use crate::stage::wasm::ShadowReport;

/// Lists every pipeline of this process with its status.
#[utoipa::path(get, path = "/v1/pipelines", tag = "pipelines", security(("bearer" = [])),
    responses((status = 200, body = Vec<PipelineStatus>), (status = 401, body = ErrorBody)))]
pub async fn list(State(st): State<Shared>) -> Json<Vec<PipelineStatus>> {
    Json(st.pipelines.values().map(|h| h.status()).collect())
}

/// A pipeline's state, stages with plugin versions, per-partition positions and lag,
/// counters and last error.
#[utoipa::path(get, path = "/v1/pipelines/{name}", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = PipelineStatus), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn status(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<PipelineStatus>, ApiError> {
    Ok(Json(st.pipeline(&name)?.status()))
}

/// Pauses a pipeline: open batches are flushed and committed, consumption stops.
#[utoipa::path(post, path = "/v1/pipelines/{name}/pause", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 202, description = "Pause requested", body = PipelineStatus),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn pause(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
) -> Result<(StatusCode, Json<PipelineStatus>), ApiError> {
    let h = st.pipeline(&name)?;
    h.pause();
    Ok((StatusCode::ACCEPTED, Json(h.status())))
}

/// Resumes a paused pipeline (also after its circuit breaker tripped).
#[utoipa::path(post, path = "/v1/pipelines/{name}/resume", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 202, description = "Resume requested", body = PipelineStatus),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn resume(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
) -> Result<(StatusCode, Json<PipelineStatus>), ApiError> {
    let h = st.pipeline(&name)?;
    h.resume();
    Ok((StatusCode::ACCEPTED, Json(h.status())))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PluginSelector {
    /// Stored plugin name.
    pub name: String,
    /// Stored version number.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "integral_u32")]
    pub version: u32,
}

/// JSON does not tell `3` from `3.0`: accept both (and reject fractions and out-of-range).
fn integral_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    let ok = n
        .as_u64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        })
        .and_then(|v| u32::try_from(v).ok());
    ok.ok_or_else(|| {
        serde::de::Error::custom(format!(
            "version must be a whole number from 0 to {}, not {n}",
            u32::MAX
        ))
    })
}

/// Hot-swaps the plugin of a WASM stage to a stored version. The batch in flight finishes on
/// the old version; the response says from which offset each partition runs the new one.
/// The choice survives restarts.
#[utoipa::path(put, path = "/v1/pipelines/{name}/stages/{stage}/plugin", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), ("stage" = String, Path)),
    request_body = PluginSelector,
    responses((status = 200, body = SwapOutcome), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Not a plugin stage", body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 422, description = "The plugin refused the stage's config", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn swap(
    State(st): State<Shared>,
    ApiPath((name, stage)): ApiPath<(String, String)>,
    ApiJson(sel): ApiJson<PluginSelector>,
) -> Result<Json<SwapOutcome>, ApiError> {
    let h = st.pipeline(&name)?;
    Ok(Json(h.swap(&stage, &sel.name, sel.version).await?))
}

/// Restores the stage's previous plugin (the one before the last swap).
#[utoipa::path(post, path = "/v1/pipelines/{name}/stages/{stage}/rollback", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), ("stage" = String, Path)),
    responses((status = 200, body = SwapOutcome), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Nothing to roll back to, or not a plugin stage", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn rollback(
    State(st): State<Shared>,
    ApiPath((name, stage)): ApiPath<(String, String)>,
) -> Result<Json<SwapOutcome>, ApiError> {
    let h = st.pipeline(&name)?;
    Ok(Json(h.rollback(&stage).await?))
}

/// Starts a shadow run: the stored version processes the same records as the live plugin,
/// its output is compared and discarded.
#[utoipa::path(post, path = "/v1/pipelines/{name}/stages/{stage}/shadow", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), ("stage" = String, Path)),
    request_body = PluginSelector,
    responses((status = 202, description = "Shadow run started", body = ShadowStarted),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Pipeline not running, or not a plugin stage", body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn shadow_start(
    State(st): State<Shared>,
    ApiPath((name, stage)): ApiPath<(String, String)>,
    ApiJson(sel): ApiJson<PluginSelector>,
) -> Result<(StatusCode, Json<ShadowStarted>), ApiError> {
    let h = st.pipeline(&name)?;
    h.shadow_start(&stage, &sel.name, sel.version).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ShadowStarted {
            pipeline: name,
            stage,
            candidate: format!("{}@v{}", sel.name, sel.version),
        }),
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShadowStarted {
    pub pipeline: String,
    pub stage: String,
    pub candidate: String,
}

/// The differences seen so far between the live plugin and the shadow candidate.
#[utoipa::path(get, path = "/v1/pipelines/{name}/stages/{stage}/shadow", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), ("stage" = String, Path)),
    responses((status = 200, body = ShadowReport), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "No shadow run, or pipeline not running", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn shadow_report(
    State(st): State<Shared>,
    ApiPath((name, stage)): ApiPath<(String, String)>,
) -> Result<Json<ShadowReport>, ApiError> {
    let h = st.pipeline(&name)?;
    Ok(Json(h.shadow_report(&stage).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ShadowStopQuery {
    /// Swap the candidate in after stopping the shadow run.
    #[serde(default)]
    pub promote: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShadowStopped {
    pub report: ShadowReport,
    /// The swap, when the candidate was promoted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapOutcome>,
}

/// Ends the shadow run (its final report); with `promote=true` the candidate is swapped in.
#[utoipa::path(delete, path = "/v1/pipelines/{name}/stages/{stage}/shadow", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), ("stage" = String, Path), ShadowStopQuery),
    responses((status = 200, body = ShadowStopped), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "No shadow run, or pipeline not running", body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn shadow_stop(
    State(st): State<Shared>,
    ApiPath((name, stage)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<ShadowStopQuery>,
) -> Result<Json<ShadowStopped>, ApiError> {
    let h = st.pipeline(&name)?;
    let (report, swap) = h.shadow_stop(&stage, q.promote).await?;
    Ok(Json(ShadowStopped { report, swap }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only this partition of the dead-letter topic.
    #[param(minimum = 0)]
    pub partition: Option<i32>,
    /// First dead-letter offset.
    #[param(minimum = 0)]
    pub from: Option<i64>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterEntry {
    pub partition: i32,
    pub offset: i64,
    /// `sluice.*` headers: stage, plugin, kind, message, source topic/partition/offset, time.
    pub headers: BTreeMap<String, String>,
    /// The original key and value (UTF-8, lossy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub value: String,
}

/// Reads the pipeline's dead-letter topic.
#[utoipa::path(get, path = "/v1/pipelines/{name}/dead-letters", tag = "pipelines", security(("bearer" = [])),
    params(("name" = String, Path), DeadLetterQuery),
    responses((status = 200, body = Vec<DeadLetterEntry>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, description = "The broker could not be read", body = ErrorBody)))]
pub async fn dead_letters(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Vec<DeadLetterEntry>>, ApiError> {
    let h = st.pipeline(&name)?;
    if q.partition.is_some_and(|p| p < 0) || q.from.is_some_and(|f| f < 0) {
        return Err(ApiError::bad_request(
            "partition and from must not be negative",
        ));
    }
    let p = h.cfg.pipeline.clone();
    let sel = crate::dlq::tools::Selection {
        partition: q.partition,
        from: q.from,
        to: None,
        limit: Some(q.limit.unwrap_or(100).min(10_000)),
    };
    let entries = tokio::task::spawn_blocking(move || {
        crate::dlq::tools::read(&p.kafka, &p.dead_letter.topic, &sel)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )
    })?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| DeadLetterEntry {
                partition: e.partition,
                offset: e.offset,
                headers: e
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.clone(),
                            String::from_utf8_lossy(&h.value).into_owned(),
                        )
                    })
                    .collect(),
                key: e
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value: String::from_utf8_lossy(&e.value).into_owned(),
            })
            .collect(),
    ))
}
