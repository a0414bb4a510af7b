//! The HTTP control plane (axum): plugin store, pipeline status and control, hot-swap,
//! rollback, shadow runs, dead letters, health and Prometheus metrics. JSON under `/v1`, one
//! error shape everywhere ([`error::ErrorBody`]), OpenAPI document generated from the handlers
//! ([`openapi::ApiDoc`], served at `/v1/openapi.json`, kept in `docs/openapi.json`).

pub mod client;
pub mod error;
pub mod openapi;
mod pipelines;
mod plugins;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Serialize;

use crate::pipeline::control::{PipelineHandle, RunState};
use crate::plugin_store::PluginStore;
use crate::stage::wasm::PluginRuntime;
use error::ApiError;

/// Settings of the control plane (from `sluice run` flags and environment).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Accepted bearer tokens; empty: no authentication (only allowed on loopback).
    pub tokens: Vec<String>,
    pub max_upload_bytes: usize,
}

impl ApiConfig {
    /// Refuses to expose an unauthenticated API beyond this machine.
    pub fn check(&self) -> Result<(), String> {
        if self.tokens.is_empty() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on {} without a bearer token: set --api-token / SLUICE_API_TOKENS, or listen on 127.0.0.1",
                self.listen
            ));
        }
        if self.tokens.iter().any(|t| t.len() < 16) {
            return Err("API tokens must be at least 16 characters".into());
        }
        Ok(())
    }
}

pub struct ApiState {
    pub pipelines: BTreeMap<String, Arc<PipelineHandle>>,
    pub store: Arc<PluginStore>,
    pub runtime: Arc<PluginRuntime>,
    pub tokens: Vec<String>,
    pub max_upload_bytes: usize,
}

pub type Shared = Arc<ApiState>;

impl ApiState {
    fn pipeline(&self, name: &str) -> Result<&Arc<PipelineHandle>, ApiError> {
        self.pipelines
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("no pipeline named {name:?}")))
    }
}

/// Compares without an early exit, so response timing does not reveal a token's prefix.
fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if st.tokens.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if st.tokens.iter().any(|e| token_matches(t, e)) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// State of every pipeline.
    pub pipelines: BTreeMap<String, RunState>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: no pipeline is starting or failed (paused ones are a deliberate state).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(st): State<Shared>) -> (StatusCode, Json<Readiness>) {
    let pipelines: BTreeMap<String, RunState> = st
        .pipelines
        .iter()
        .map(|(n, h)| (n.clone(), h.state()))
        .collect();
    let ready = pipelines
        .values()
        .all(|s| !matches!(s, RunState::Starting | RunState::Failed));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, pipelines }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health", security(("bearer" = [])), responses(
    (status = 200, content_type = "text/plain", body = String),
    (status = 401, body = error::ErrorBody)))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

pub fn router(state: Shared) -> Router {
    let upload_limit = state.max_upload_bytes;
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/plugins", get(plugins::list))
        .route(
            "/v1/plugins/{name}",
            get(plugins::get_one)
                .post(plugins::upload)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/v1/plugins/{name}/versions/{version}",
            delete(plugins::delete_version),
        )
        .route("/v1/pipelines", get(pipelines::list))
        .route("/v1/pipelines/{name}", get(pipelines::status))
        .route("/v1/pipelines/{name}/pause", post(pipelines::pause))
        .route("/v1/pipelines/{name}/resume", post(pipelines::resume))
        .route(
            "/v1/pipelines/{name}/stages/{stage}/plugin",
            put(pipelines::swap),
        )
        .route(
            "/v1/pipelines/{name}/stages/{stage}/rollback",
            post(pipelines::rollback),
        )
        .route(
            "/v1/pipelines/{name}/stages/{stage}/shadow",
            post(pipelines::shadow_start)
                .get(pipelines::shadow_report)
                .delete(pipelines::shadow_stop),
        )
        .route(
            "/v1/pipelines/{name}/dead-letters",
            get(pipelines::dead_letters),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(not_found)
        // Bodies other than uploads are small JSON documents.
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: &ApiConfig,
    state: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, auth = !cfg.tokens.is_empty(), "control plane listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        assert!(super::token_matches(
            "abcdefabcdefabcdef",
            "abcdefabcdefabcdef"
        ));
        assert!(!super::token_matches(
            "abcdefabcdefabcde",
            "abcdefabcdefabcdef"
        ));
        assert!(!super::token_matches("", "x"));
    }
}
