//! A small client of the control plane, used by the `sluice plugin push|list|swap|...` and
//! `sluice pipeline status|pause|resume` commands.

use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the sluice API at {url}: {message}")]
    Connect { url: String, message: String },
    /// The server stopped reading an upload: it answers an upload over its limit (413) as soon
    /// as it sees the declared length, and closes the connection before the client has
    /// written the body, so the client sees a write error instead of that answer.
    #[error(
        "the sluice API at {url} closed the connection while {bytes} bytes were being uploaded \
         ({message}): the usual cause is a file over the server's upload limit \
         (`sluice run --max-upload-mb`, default 64)"
    )]
    UploadCut {
        url: String,
        bytes: usize,
        message: String,
    },
    /// The API answered with an error (its `{"error": {...}}` body, summarised).
    #[error("{status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
}

pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request; `body` is JSON, or raw bytes with a content type.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<&Value>,
        raw: Option<(Vec<u8>, &str)>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(j) = json {
            req = req.json(j);
        }
        let mut upload = 0;
        if let Some((bytes, content_type)) = raw {
            upload = bytes.len();
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let connect = |e: reqwest::Error| ClientError::Connect {
            url: url.clone(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(|e| {
            // Only a body the server could refuse for its size, on a server that was reached.
            if upload > 1 << 20 && !e.is_connect() && !e.is_timeout() {
                ClientError::UploadCut {
                    url: url.clone(),
                    bytes: upload,
                    message: e.to_string(),
                }
            } else {
                connect(e)
            }
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(connect)?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(body);
        }
        let field = |k: &str| {
            body.pointer(&format!("/error/{k}"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Err(ClientError::Api {
            status,
            code: field("code"),
            message: field("message"),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None, None).await
    }
}
