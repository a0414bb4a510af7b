//! `/v1/plugins`: upload (validated, precompiled, stored by sha256), list, delete.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use super::Shared;
use crate::config::{PluginLimits, WasiGrants};
use crate::plugin_store::{PluginInfo, VersionInfo};
use crate::stage::wasm::LogLabels;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadResult {
    pub name: String,
    pub version: VersionInfo,
    /// `false` when identical bytes were already stored under this name (that version is
    /// returned).
    pub created: bool,
    /// What was checked: the component matches the `sluice:plugin/plugin` world, was
    /// precompiled, and its `init` accepted the given config.
    pub checks: Vec<String>,
}

/// The bytes of a WebAssembly component (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct WasmComponent(#[allow(dead_code)] Vec<u8>);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// JSON handed to the plugin's `init` for the upload check (default `{}`; not JSON: 422).
    pub config: Option<String>,
}

/// Lists stored plugins and their versions.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins", security(("bearer" = [])), responses(
    (status = 200, body = Vec<PluginInfo>), (status = 401, body = ErrorBody)))]
pub async fn list(State(st): State<Shared>) -> Result<Json<Vec<PluginInfo>>, ApiError> {
    Ok(Json(st.store.list()?))
}

/// One plugin's versions.
#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins", security(("bearer" = [])),
    params(("name" = String, Path, description = "Plugin name")),
    responses((status = 200, body = PluginInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<PluginInfo>, ApiError> {
    Ok(Json(st.store.plugin(&name)?))
}

/// Uploads a component as the next version of `name`. The body is the component itself
/// (`application/wasm` or `application/octet-stream`), or `multipart/form-data` with a
/// `component` file field and an optional `config` field. It is checked against the WIT
/// world, precompiled, and its `init` is run with the config before it is stored.
#[utoipa::path(post, path = "/v1/plugins/{name}", tag = "plugins", security(("bearer" = [])),
    params(("name" = String, Path, description = "Plugin name: 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)", pattern = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"), UploadQuery),
    request_body(content = WasmComponent, content_type = "application/octet-stream", description = "The component (`application/wasm` is accepted too; or multipart/form-data with `component` and `config`)"),
    responses(
        (status = 201, description = "Stored as a new version", body = UploadResult),
        (status = 200, description = "Identical bytes already stored: that version", body = UploadResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, description = "Larger than the upload limit", body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 422, description = "Not a valid plugin: the validation error", body = ErrorBody)))]
pub async fn upload(
    State(st): State<Shared>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    req: Request,
) -> Result<(StatusCode, Json<UploadResult>), ApiError> {
    crate::plugin_store::check_name(&name)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_ascii_lowercase();
    let (bytes, form_config) = if content_type.starts_with("multipart/form-data") {
        read_multipart(req).await?
    } else if content_type.starts_with("application/wasm")
        || content_type.starts_with("application/octet-stream")
    {
        let body = Bytes::from_request(req, &())
            .await
            .map_err(|r| rejection(r.status(), r.body_text()))?;
        (body.to_vec(), None)
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the component as application/wasm, application/octet-stream or multipart/form-data, not {content_type}"),
        ));
    };
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plugin",
            "empty body: expected a WebAssembly component",
        ));
    }
    let config = form_config
        .or(q.config)
        .filter(|c| !c.trim().is_empty())
        .unwrap_or_else(|| "{}".into());
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&config) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            format!("config for the init check is not JSON: {e}"),
        ));
    }
    // Compiling a component takes a while: off the async threads.
    let runtime = st.runtime.clone();
    let n = name.clone();
    let data = Arc::new(bytes);
    let d = data.clone();
    tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        let plugin = runtime.load_bytes(&n, &d)?;
        plugin.instantiate(
            &config,
            &PluginLimits::default(),
            &WasiGrants::default(),
            Arc::new(LogLabels {
                pipeline: "-".into(),
                stage: "upload-check".into(),
                plugin: plugin.id(),
            }),
        )?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let (version, created) = st.store.put(&name, &data)?;
    tracing::info!(plugin = %name, version = version.version, sha256 = %version.sha256, created, "plugin uploaded");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(UploadResult {
            name,
            version,
            created,
            checks: vec![
                "component matches the sluice:plugin/plugin world".into(),
                "precompiled".into(),
                "init accepted the config".into(),
            ],
        }),
    ))
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "too_large", text)
    } else {
        ApiError::bad_request(text)
    }
}

async fn read_multipart(req: Request) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|r| rejection(r.status(), r.body_text()))?;
    let mut component = None;
    let mut config = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| rejection(e.status(), e.body_text()))?
    {
        match field.name() {
            Some("component") => {
                let b = field
                    .bytes()
                    .await
                    .map_err(|e| rejection(e.status(), e.body_text()))?;
                component = Some(b.to_vec());
            }
            Some("config") => {
                config = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| rejection(e.status(), e.body_text()))?,
                );
            }
            _ => {}
        }
    }
    let component = component
        .ok_or_else(|| ApiError::bad_request("multipart upload without a `component` field"))?;
    Ok((component, config))
}

/// Deletes a version; refused (409) while a stage uses it or a shadow run tries it.
#[utoipa::path(delete, path = "/v1/plugins/{name}/versions/{version}", tag = "plugins", security(("bearer" = [])),
    params(("name" = String, Path), ("version" = u32, Path)),
    responses((status = 200, body = VersionInfo), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "In use", body = ErrorBody)))]
pub async fn delete_version(
    State(st): State<Shared>,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<VersionInfo>, ApiError> {
    let in_use: Vec<String> = st
        .pipelines
        .values()
        .flat_map(|h| h.shadow_users())
        .filter(|(_, r)| r.name == name && r.version == Some(version))
        .map(|(who, _)| who)
        .collect();
    Ok(Json(st.store.delete(&name, version, &in_use)?))
}
