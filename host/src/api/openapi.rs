//! The OpenAPI document, generated from the handlers' annotations. `sluice openapi` prints
//! it; `docs/openapi.json` is that output (a test keeps them equal).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{error, pipelines, plugins};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice control plane",
        description = "Upload WASM plugins, hot-swap them into running pipelines, run shadow comparisons, roll back, inspect status, dead letters and metrics. Every error is `{\"error\": {\"code\", \"message\"}}`.",
        version = "1"
    ),
    paths(
        super::healthz, super::readyz, super::metrics,
        plugins::list, plugins::get_one, plugins::upload, plugins::delete_version,
        pipelines::list, pipelines::status, pipelines::pause, pipelines::resume,
        pipelines::swap, pipelines::rollback,
        pipelines::shadow_start, pipelines::shadow_report, pipelines::shadow_stop,
        pipelines::dead_letters,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "plugins", description = "The plugin store"),
        (name = "pipelines", description = "Running pipelines"),
        (name = "health", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON (what `docs/openapi.json` holds).
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Serves the document.
#[allow(clippy::unused_async)]
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
