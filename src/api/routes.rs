//! Routing and handlers of the v1 HTTP API: parses paths and bodies, checks the caller's grant,
//! calls the key ring, shapes JSON (or raw octet-stream) answers, and records every request in
//! the audit log. Every error goes through `ApiError`; no handler logs a body.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use super::b64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::AppState;
use super::auth::{Operation, Peer, Principal};
use super::error::ApiError;
use crate::audit::Record;
use crate::crypto::envelope::SealBuffer;
use crate::crypto::{Purpose, SecretBytes, SecretVec};
use crate::keyring::{Approval, ShredTarget};
use crate::tenant::TenantId;

/// The OpenAPI 3 description of this API, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

// Header names as constants: inserting a `&str` name parses and allocates it on each request.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Base64 caller AAD for octet-stream seal/open.
pub const AAD_HEADER: HeaderName = HeaderName::from_static("x-kms-aad");
/// Key version of an octet-stream seal.
pub const KEY_VERSION_HEADER: HeaderName = HeaderName::from_static("x-key-version");
const JSON: &str = "application/json";
/// The whole body must arrive within this.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const OCTETS: &str = "application/octet-stream";

/// What a tenant path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Seal,
    Open,
    SealBatch,
    OpenBatch,
    Datakey,
    DatakeyUnwrap,
    Rewrap,
    RewrapBatch,
    Keys,
    Rotate,
    Retire,
    Shred,
    Tokenize,
    TokenizeBatch,
    Reveal,
    DeleteToken,
    SetRoot,
}

impl Action {
    fn operation(self) -> Operation {
        match self {
            Action::Seal | Action::SealBatch => Operation::Seal,
            Action::Open | Action::OpenBatch => Operation::Open,
            Action::Datakey => Operation::Datakey,
            Action::DatakeyUnwrap => Operation::DatakeyUnwrap,
            Action::Rewrap | Action::RewrapBatch => Operation::Rewrap,
            Action::Keys => Operation::KeysRead,
            Action::Rotate => Operation::AdminRotate,
            Action::Retire => Operation::AdminRetire,
            Action::Shred => Operation::AdminShred,
            Action::Tokenize | Action::TokenizeBatch => Operation::Tokenize,
            // Refined after the body is read: `reveal.masked` suffices for masked reveals.
            Action::Reveal => Operation::Reveal,
            Action::DeleteToken => Operation::TokensDelete,
            Action::SetRoot => Operation::AdminRoot,
        }
    }

    fn method(self) -> Method {
        match self {
            Action::Keys => Method::GET,
            Action::DeleteToken => Method::DELETE,
            _ => Method::POST,
        }
    }

    /// The name recorded in the audit log.
    fn audit_name(self) -> &'static str {
        match self {
            Action::Shred => "admin.shred.request",
            other => other.operation().as_str(),
        }
    }

    fn is_admin(self) -> bool {
        matches!(
            self,
            Action::Rotate | Action::Retire | Action::Shred | Action::DeleteToken | Action::SetRoot
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Healthz,
    Readyz,
    OpenApi,
    Metrics,
    Tenants,
    Approvals,
    Approve { id: &'a str },
    Tenant { tenant: &'a str, action: Action },
    Token { tenant: &'a str, token: &'a str },
}

impl Route<'_> {
    /// The operation a request on this route is counted under in metrics, and (for all but
    /// the unauthenticated routes) recorded under in the audit log.
    fn operation(self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::OpenApi => "openapi",
            Route::Metrics => "metrics",
            Route::Tenants => "tenants.list",
            Route::Approvals => "admin.shred.list",
            Route::Approve { .. } => "admin.shred.approve",
            Route::Tenant { action, .. } => action.audit_name(),
            Route::Token { .. } => Action::DeleteToken.audit_name(),
        }
    }
}

/// The `op` metrics label of a path: its route's operation, or `unknown` (never the path,
/// whose values are unbounded).
fn path_operation(path: &str) -> &'static str {
    route(path).map_or("unknown", Route::operation)
}

/// Every route of the router, as (method, path template): the OpenAPI check compares with this.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/tenants/{tenant}/seal"),
    ("POST", "/v1/tenants/{tenant}/open"),
    ("POST", "/v1/tenants/{tenant}/seal:batch"),
    ("POST", "/v1/tenants/{tenant}/open:batch"),
    ("POST", "/v1/tenants/{tenant}/datakey"),
    ("POST", "/v1/tenants/{tenant}/datakey:unwrap"),
    ("POST", "/v1/tenants/{tenant}/rewrap"),
    ("POST", "/v1/tenants/{tenant}/rewrap:batch"),
    ("GET", "/v1/tenants/{tenant}/keys"),
    ("POST", "/v1/tenants/{tenant}/keys:rotate"),
    ("POST", "/v1/tenants/{tenant}/keys:retire"),
    ("POST", "/v1/tenants/{tenant}:shred"),
    ("POST", "/v1/tenants/{tenant}/root"),
    ("GET", "/v1/approvals"),
    ("POST", "/v1/approvals/{id}:approve"),
    ("POST", "/v1/tenants/{tenant}/tokens"),
    ("POST", "/v1/tenants/{tenant}/tokens:batch"),
    ("POST", "/v1/tenants/{tenant}/tokens:reveal"),
    ("DELETE", "/v1/tenants/{tenant}/tokens/{token}"),
];

pub fn route(path: &str) -> Option<Route<'_>> {
    match path {
        "/healthz" => return Some(Route::Healthz),
        "/readyz" => return Some(Route::Readyz),
        "/v1/openapi.json" => return Some(Route::OpenApi),
        "/metrics" => return Some(Route::Metrics),
        "/v1/tenants" => return Some(Route::Tenants),
        "/v1/approvals" => return Some(Route::Approvals),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/approvals/") {
        let id = rest.strip_suffix(":approve")?;
        return (!id.is_empty() && !id.contains('/')).then_some(Route::Approve { id });
    }
    let rest = path.strip_prefix("/v1/tenants/")?;
    let Some((tenant, action)) = rest.split_once('/') else {
        // Tenant ids cannot contain ':', so the suffix is unambiguous.
        let tenant = rest.strip_suffix(":shred")?;
        return Some(Route::Tenant {
            tenant,
            action: Action::Shred,
        });
    };
    let action = match action {
        "seal" => Action::Seal,
        "open" => Action::Open,
        "seal:batch" => Action::SealBatch,
        "open:batch" => Action::OpenBatch,
        "datakey" => Action::Datakey,
        "datakey:unwrap" => Action::DatakeyUnwrap,
        "rewrap" => Action::Rewrap,
        "rewrap:batch" => Action::RewrapBatch,
        "keys" => Action::Keys,
        "keys:rotate" => Action::Rotate,
        "keys:retire" => Action::Retire,
        "root" => Action::SetRoot,
        "tokens" => Action::Tokenize,
        "tokens:batch" => Action::TokenizeBatch,
        "tokens:reveal" => Action::Reveal,
        other => {
            let token = other.strip_prefix("tokens/")?;
            return (!token.is_empty() && !token.contains('/'))
                .then_some(Route::Token { tenant, token });
        }
    };
    Some(Route::Tenant { tenant, action })
}

// ---- request and response bodies ----

// Seal and open fields borrow from the request body, which is itself a zeroizing buffer:
// base64 never needs JSON escapes, so no copy of the field is made at all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SealItem<'a> {
    #[serde(borrow)]
    plaintext: SecretText<'a>,
    #[serde(default, borrow)]
    aad: Option<Text<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenItem<'a> {
    #[serde(borrow)]
    ciphertext: Text<'a>,
    #[serde(default, borrow)]
    aad: Option<Text<'a>>,
}

/// A JSON string borrowed from the body unless it has escapes. (serde borrows a bare
/// `Cow<str>` field, but not one inside an `Option`.)
struct Text<'a>(Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            // Unescaped by the parser: an owned copy of exactly the string's length.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A secret JSON string: borrowed from the (zeroizing) request body when it has no escapes,
/// else the unescaped copy, moved into a string that is zeroized on drop.
enum SecretText<'a> {
    Borrowed(&'a str),
    Owned(SecretString),
}

impl SecretText<'_> {
    fn expose_bytes(&self) -> &[u8] {
        match self {
            SecretText::Borrowed(s) => s.as_bytes(),
            SecretText::Owned(s) => s.expose_secret().as_bytes(),
        }
    }
}

impl std::fmt::Debug for SecretText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText([REDACTED])")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for SecretText<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Text::deserialize(d)?.0 {
            Cow::Borrowed(s) => SecretText::Borrowed(s),
            Cow::Owned(s) => SecretText::Owned(SecretString::from(s)),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<T> {
    items: Vec<T>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DatakeyRequest {
    #[serde(default)]
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatakeyUnwrapRequest {
    wrapped_key: String,
    #[serde(default)]
    aad: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireRequest {
    min_decrypt_version: u32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ShredRequest {
    /// Shred one (non-active) version instead of the whole tenant.
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    value: SecretString,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    deterministic: bool,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    /// `keep` (default) or `tokenize`, for the email format.
    #[serde(default)]
    email_domain: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevealBody {
    tokens: Vec<String>,
    /// `last4`: all but the last four characters masked.
    #[serde(default)]
    mask: Option<String>,
}

#[derive(Serialize)]
struct TokenView {
    token: String,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

#[derive(Serialize)]
struct RevealedValue<'a> {
    value: &'a str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRootRequest {
    /// The customer-managed key: ARN, alias or key id.
    aws_kms_key: String,
}

#[derive(Serialize)]
struct RootMoveView {
    #[serde(flatten)]
    tenant: TenantView,
    /// Live versions, all now wrapped under the tenant's root alone.
    versions: u64,
    /// Versions rewrapped by this request.
    rewrapped: u64,
}

#[derive(Serialize)]
struct Sealed {
    ciphertext: String,
    key_version: u32,
}

/// Plaintext answers are serialised from borrowed, zeroizing strings.
#[derive(Serialize)]
struct Opened<'a> {
    plaintext: &'a str,
}

#[derive(Serialize)]
struct IssuedKey<'a> {
    plaintext_key: &'a str,
    wrapped_key: String,
    key_version: u32,
}

#[derive(Serialize)]
struct UnwrappedKey<'a> {
    plaintext_key: &'a str,
}

#[derive(Serialize)]
struct ItemError {
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Results<T> {
    results: Vec<ItemResult<T>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ItemResult<T> {
    Ok(T),
    Err { error: ItemError },
}

#[derive(Serialize)]
struct KeyVersionView {
    version: u32,
    state: crate::keyring::KeyState,
    created_at: i64,
    roots: Vec<String>,
}

#[derive(Serialize)]
struct TenantView {
    tenant: String,
    active_version: u32,
    created_at: i64,
    min_decrypt_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    destroyed_at: Option<i64>,
    /// The tenant's own root (BYOK), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    root: Option<String>,
}

#[derive(Serialize)]
struct KeysView {
    #[serde(flatten)]
    tenant: TenantView,
    versions: Vec<KeyVersionView>,
}

#[derive(Serialize)]
struct ApprovalView {
    approval_id: String,
    action: &'static str,
    tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    state: &'static str,
    requested_by: String,
    requested_at: i64,
    expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    approved_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    executed_at: Option<i64>,
}

impl From<&Approval> for ApprovalView {
    fn from(a: &Approval) -> Self {
        let (action, version) = match a.target {
            ShredTarget::Tenant => ("shred-tenant", None),
            ShredTarget::Version(v) => ("shred-version", Some(v)),
        };
        ApprovalView {
            approval_id: a.id.clone(),
            action,
            tenant: a.tenant.to_string(),
            version,
            state: a.state.as_str(),
            requested_by: a.requested_by.clone(),
            requested_at: a.requested_at,
            expires_at: a.expires_at,
            approved_by: a.approved_by.clone(),
            executed_at: a.executed_at,
        }
    }
}

impl From<&crate::keyring::TenantRecord> for TenantView {
    fn from(t: &crate::keyring::TenantRecord) -> Self {
        TenantView {
            tenant: t.tenant.to_string(),
            active_version: t.active_version,
            created_at: t.created_at,
            min_decrypt_version: t.min_decrypt_version,
            destroyed_at: t.destroyed_at,
            root: t.root.as_ref().map(|r| r.to_string()),
        }
    }
}

// ---- the handler ----

/// What a request did, for its audit record.
#[derive(Default)]
struct Trail {
    principal: Option<String>,
    tenant: Option<String>,
    operation: Option<&'static str>,
    key_version: Option<u32>,
    count: Option<u64>,
    admin: bool,
    approval: Option<Approval>,
}

/// The answer when too many requests are in flight: immediate, without reading the body.
pub fn overloaded(state: &AppState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let id = request_id(req);
    let mut resp = error_response(&ApiError::Overloaded, &id);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp.headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    let (_, code) = ApiError::Overloaded.status_and_code();
    state
        .keyring
        .metrics()
        .request(path_operation(req.uri().path()), code, started.elapsed());
    resp
}

/// Handles one request; never fails (errors become error responses).
pub async fn handle(
    state: Arc<AppState>,
    peer: Peer,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let request_id = request_id(&req);
    let method = req.method().clone();
    // Copied, not a clone of the URI: that would share (and keep alive) hyper's read buffer.
    let path = req.uri().path().to_owned();
    let mut trail = Trail::default();
    let result = dispatch(&state, &peer, req, &request_id, &mut trail).await;
    let (mut resp, outcome) = match result {
        Ok(r) => (r, "ok"),
        Err(e) => (error_response(&e, &request_id), e.status_and_code().1),
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let status = resp.status();
    // Requests refused before their handler named the operation count under their route's.
    let op = trail.operation.unwrap_or_else(|| path_operation(&path));
    audit(&state, &peer, &request_id, trail, status, outcome).await;
    state
        .keyring
        .metrics()
        .request(op, outcome, started.elapsed());
    if status.is_server_error() {
        tracing::warn!(%request_id, %peer, %method, %path, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(%request_id, %peer, %method, %path, status = status.as_u16(), "request");
    }
    resp
}

/// One record per request: failed authentication individually, admin operations durably,
/// data-plane operations per the configured mode.
async fn audit(
    state: &AppState,
    peer: &Peer,
    request_id: &str,
    trail: Trail,
    status: StatusCode,
    outcome: &'static str,
) {
    let Some(operation) = trail.operation else {
        return;
    };
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if !refused && !trail.admin && !state.audit.records_each() {
        // Aggregated (or unrecorded) data-plane requests: counted without building a record.
        state.audit.count_data(
            trail.principal,
            trail.tenant,
            operation,
            outcome,
            trail.count.unwrap_or(1),
        );
        return;
    }
    let mut record = Record {
        operation: operation.to_owned(),
        outcome: outcome.to_owned(),
        request_id: Some(request_id.to_owned()),
        principal: trail.principal,
        peer: Some(peer.to_string()),
        tenant: trail.tenant,
        key_version: trail.key_version,
        count: trail.count,
        ..Record::default()
    };
    if let Some(a) = &trail.approval {
        record.approval_id = Some(a.id.clone());
        record.requested_by = Some(a.requested_by.clone());
        record.approved_by = a.approved_by.clone();
    }
    if refused {
        state.audit.event(record);
    } else if trail.admin {
        if let Err(e) = state.audit.admin(record).await {
            tracing::error!(%request_id, error = %e, "could not record the outcome of an admin operation");
        }
    } else {
        state.audit.data(record);
    }
}

/// Records that an admin operation is about to run; if the log cannot take it, the operation
/// does not run (fail closed).
async fn gate(
    state: &AppState,
    peer: &Peer,
    request_id: &str,
    trail: &Trail,
    detail: String,
) -> Result<(), ApiError> {
    let record = Record {
        operation: trail.operation.unwrap_or("admin").to_owned(),
        outcome: "authorized".into(),
        request_id: Some(request_id.to_owned()),
        principal: trail.principal.clone(),
        peer: Some(peer.to_string()),
        tenant: trail.tenant.clone(),
        detail: Some(detail),
        approval_id: trail.approval.as_ref().map(|a| a.id.clone()),
        requested_by: trail.approval.as_ref().map(|a| a.requested_by.clone()),
        ..Record::default()
    };
    state.audit.admin(record).await.map_err(|e| {
        tracing::error!(%request_id, error = %e, "audit log unavailable; refusing an admin operation");
        ApiError::AuditUnavailable
    })
}

fn authenticate<'a>(
    state: &'a AppState,
    peer: &Peer,
    req: &Request<Incoming>,
) -> Result<&'a Principal, ApiError> {
    state.auth.authenticate(
        peer,
        req.headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    )
}

async fn dispatch(
    state: &AppState,
    peer: &Peer,
    req: Request<Incoming>,
    request_id: &str,
    trail: &mut Trail,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let path = req.uri().path().to_owned();
    let route = route(&path).ok_or(ApiError::NotFound)?;
    let mut token_param: Option<String> = None;
    let (tenant_raw, action) = match route {
        Route::Metrics => {
            // Unauthenticated like /healthz: counts, histograms and gauges labelled by operation, outcome and root id; no tenants, no keys.
            if req.method() != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            // Sizes are sampled when scraped rather than kept current on every request.
            state.keyring.sample_caches().await;
            let metrics = state.keyring.metrics();
            metrics.audit_queue(state.audit.backlog(), state.audit.dropped_total());
            let mut resp = Response::new(Full::new(Bytes::from(metrics.encode())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            return Ok(resp);
        }
        Route::Healthz | Route::Readyz => {
            if req.method() != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            if route == Route::Readyz {
                state.keyring.ready().await.map_err(|e| {
                    tracing::warn!(error = %e, "not ready");
                    ApiError::NotReady
                })?;
                return Ok(json_response(
                    StatusCode::OK,
                    br#"{"status":"ready"}"#.to_vec(),
                ));
            }
            return Ok(json_response(
                StatusCode::OK,
                br#"{"status":"ok"}"#.to_vec(),
            ));
        }
        Route::OpenApi => {
            if req.method() != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            return Ok(json_response(StatusCode::OK, OPENAPI.as_bytes().to_vec()));
        }
        Route::Tenants => {
            if req.method() != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            trail.operation = Some(route.operation());
            let principal = authenticate(state, peer, &req)?;
            trail.principal = Some(principal.name.clone());
            if !principal.holds(Operation::KeysRead) {
                return Err(ApiError::Forbidden);
            }
            let visible: Vec<TenantView> = state
                .keyring
                .tenants()
                .await?
                .iter()
                .filter(|t| principal.may(Operation::KeysRead, &t.tenant))
                .map(TenantView::from)
                .collect();
            trail.count = Some(visible.len() as u64);
            return Ok(json_ok(&serde_json::json!({ "tenants": visible })));
        }
        Route::Approvals => {
            if req.method() != Method::GET {
                return Err(ApiError::MethodNotAllowed);
            }
            trail.operation = Some(route.operation());
            let principal = authenticate(state, peer, &req)?;
            trail.principal = Some(principal.name.clone());
            if !principal.holds(Operation::AdminShred) {
                return Err(ApiError::Forbidden);
            }
            let pending: Vec<ApprovalView> = state
                .keyring
                .pending_approvals()
                .await?
                .iter()
                .filter(|a| principal.may(Operation::AdminShred, &a.tenant))
                .map(ApprovalView::from)
                .collect();
            return Ok(json_ok(&serde_json::json!({ "approvals": pending })));
        }
        Route::Approve { id } => {
            if req.method() != Method::POST {
                return Err(ApiError::MethodNotAllowed);
            }
            trail.operation = Some(route.operation());
            trail.admin = true;
            let principal = authenticate(state, peer, &req)?;
            trail.principal = Some(principal.name.clone());
            let kr = &state.keyring;
            let pending = kr
                .metrics()
                .store_call("approval", kr.store().approval(id))
                .await
                .map_err(crate::keyring::KeyringError::from)?
                .ok_or(ApiError::ApprovalNotFound)?;
            trail.tenant = Some(pending.tenant.to_string());
            if !principal.may(Operation::AdminShred, &pending.tenant) {
                return Err(ApiError::Forbidden);
            }
            trail.approval = Some(pending.clone());
            gate(state, peer, request_id, trail, format!("approve {id}")).await?;
            let done = state.keyring.approve_shred(id, &principal.name).await?;
            trail.operation = Some("admin.shred.execute");
            if let ShredTarget::Version(v) = done.target {
                trail.key_version = Some(v);
            }
            let view = ApprovalView::from(&done);
            trail.approval = Some(done);
            return Ok(json_ok(&view));
        }
        Route::Tenant { tenant, action } => (tenant.to_owned(), action),
        Route::Token { tenant, token } => {
            token_param = Some(token.to_owned());
            (tenant.to_owned(), Action::DeleteToken)
        }
    };
    if req.method() != action.method() {
        return Err(ApiError::MethodNotAllowed);
    }
    trail.operation = Some(action.audit_name());
    trail.admin = action.is_admin();
    let principal = authenticate(state, peer, &req)?;
    trail.principal = Some(principal.name.clone());
    let tenant = TenantId::parse(&tenant_raw).map_err(|_| ApiError::InvalidTenant)?;
    trail.tenant = Some(tenant.to_string());
    let allowed = match action {
        Action::Reveal => {
            principal.may(Operation::Reveal, &tenant)
                || principal.may(Operation::RevealMasked, &tenant)
        }
        _ => principal.may(action.operation(), &tenant),
    };
    if !allowed {
        return Err(ApiError::Forbidden);
    }

    // Only octet-stream switches to raw bodies; anything else is read as JSON, so that
    // `curl -d` (form content type by default) works and a non-JSON body gets a JSON error.
    let octets = req.headers().get(CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        let base = ct.split(|b| *b == b';').next().unwrap_or(ct).trim_ascii();
        base.eq_ignore_ascii_case(OCTETS.as_bytes())
    });
    if octets && !matches!(action, Action::Seal | Action::Open) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let header_aad = match req.headers().get(AAD_HEADER) {
        Some(v) if octets => Some(decode("aad", v.as_bytes())?),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "the x-kms-aad header is only for application/octet-stream bodies".into(),
            ));
        }
        None => None,
    };
    // An octet-stream seal reads its body straight into the envelope's buffer, after room for
    // the header, and is sealed in place.
    let headroom = if octets && action == Action::Seal {
        crate::crypto::envelope::HEADER_LEN
    } else {
        0
    };
    let body = read_body(req, state.limits.max_body_bytes, headroom).await?;
    let kr = &state.keyring;
    let empty_body = body.iter().all(u8::is_ascii_whitespace);

    match action {
        Action::Seal if octets => {
            let aad = header_aad.unwrap_or_default();
            let plaintext = SealBuffer::from_headroom(body).map_err(|_| ApiError::Internal)?;
            let (ct, version) = kr
                .seal_buffer(&tenant, Purpose::Data, &aad, plaintext)
                .await?;
            trail.key_version = Some(version);
            let mut resp = Response::new(Full::new(Bytes::from(ct)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OCTETS));
            resp.headers_mut()
                .insert(KEY_VERSION_HEADER, HeaderValue::from(version));
            Ok(resp)
        }
        Action::Open if octets => {
            let aad = header_aad.unwrap_or_default();
            let pt = kr.open_owned(&tenant, Purpose::Data, &aad, body).await?;
            let mut resp = Response::new(Full::new(zeroizing_bytes(pt.into_secret_vec())));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OCTETS));
            Ok(resp)
        }
        Action::Seal => {
            let item: SealItem = parse_json(&body)?;
            let (ciphertext, key_version) = seal_raw(state, &tenant, item).await?;
            trail.key_version = Some(key_version);
            sealed_response(&ciphertext, key_version)
        }
        Action::Open => {
            let item: OpenItem = parse_json(&body)?;
            let pt = open_item(state, &tenant, item).await?;
            Ok(opened_response(pt.expose()))
        }
        Action::Rewrap => {
            let item: OpenItem = parse_json(&body)?;
            let sealed = rewrap_item(state, &tenant, item).await?;
            trail.key_version = Some(sealed.key_version);
            Ok(json_ok(&sealed))
        }
        Action::SealBatch | Action::RewrapBatch => {
            let results = if action == Action::SealBatch {
                let batch: Batch<SealItem> = parse_json(&body)?;
                check_batch(state, batch.items.len())?;
                let mut results = Vec::with_capacity(batch.items.len());
                for item in batch.items {
                    results.push(match seal_item(state, &tenant, item).await {
                        Ok(s) => ItemResult::Ok(s),
                        Err(e) => item_error(e)?,
                    });
                }
                results
            } else {
                let batch: Batch<OpenItem> = parse_json(&body)?;
                check_batch(state, batch.items.len())?;
                let mut results = Vec::with_capacity(batch.items.len());
                for item in batch.items {
                    results.push(match rewrap_item(state, &tenant, item).await {
                        Ok(s) => ItemResult::Ok(s),
                        Err(e) => item_error(e)?,
                    });
                }
                results
            };
            trail.count = Some(results.len() as u64);
            Ok(json_ok(&Results { results }))
        }
        Action::OpenBatch => {
            let batch: Batch<OpenItem> = parse_json(&body)?;
            check_batch(state, batch.items.len())?;
            trail.count = Some(batch.items.len() as u64);
            let mut opened = Vec::with_capacity(batch.items.len());
            for item in batch.items {
                opened.push(open_item(state, &tenant, item).await);
            }
            batch_open_response(opened)
        }
        Action::Datakey => {
            let req: DatakeyRequest = if empty_body {
                DatakeyRequest::default()
            } else {
                parse_json(&body)?
            };
            let aad = optional_b64("aad", req.aad.as_deref())?;
            let issued = kr.issue_datakey(&tenant, &aad).await?;
            trail.key_version = Some(issued.key_version);
            let key_b64 = Zeroizing::new(b64::encode(issued.plaintext.expose()));
            Ok(secret_body(&IssuedKey {
                plaintext_key: &key_b64,
                wrapped_key: b64::encode(&issued.sealed),
                key_version: issued.key_version,
            }))
        }
        Action::DatakeyUnwrap => {
            let req: DatakeyUnwrapRequest = parse_json(&body)?;
            let wrapped = decode("wrapped_key", req.wrapped_key.as_bytes())?;
            let aad = optional_b64("aad", req.aad.as_deref())?;
            let key = kr.unwrap_datakey(&tenant, &aad, &wrapped).await?;
            let key_b64 = Zeroizing::new(b64::encode(key.expose()));
            Ok(secret_body(&UnwrappedKey {
                plaintext_key: &key_b64,
            }))
        }
        Action::Keys => {
            let keys = kr.describe(&tenant).await?;
            Ok(json_ok(&KeysView {
                tenant: TenantView::from(&keys.tenant),
                versions: keys
                    .versions
                    .into_iter()
                    .map(|v| KeyVersionView {
                        version: v.version,
                        state: v.state,
                        created_at: v.created_at,
                        roots: v
                            .wrappings
                            .into_iter()
                            .map(|w| w.root.to_string())
                            .collect(),
                    })
                    .collect(),
            }))
        }
        Action::Rotate => {
            if !empty_body {
                let _: serde_json::Map<String, serde_json::Value> = parse_json(&body)?;
            }
            gate(state, peer, request_id, trail, "rotate".into()).await?;
            let record = kr.rotate(&tenant).await?;
            trail.key_version = Some(record.active_version);
            Ok(json_ok(&TenantView::from(&record)))
        }
        Action::Retire => {
            let req: RetireRequest = parse_json(&body)?;
            gate(
                state,
                peer,
                request_id,
                trail,
                format!("retire below {}", req.min_decrypt_version),
            )
            .await?;
            let record = kr.retire(&tenant, req.min_decrypt_version).await?;
            trail.key_version = Some(record.min_decrypt_version);
            Ok(json_ok(&TenantView::from(&record)))
        }
        Action::Tokenize | Action::TokenizeBatch => {
            let bodies = if action == Action::Tokenize {
                vec![parse_json::<TokenizeBody>(&body)?]
            } else {
                let batch: Batch<TokenizeBody> = parse_json(&body)?;
                check_batch(state, batch.items.len())?;
                batch.items
            };
            let mut items = Vec::with_capacity(bodies.len());
            let mut early: Vec<Option<ApiError>> = Vec::with_capacity(bodies.len());
            for b in bodies {
                match tokenize_item(b) {
                    Ok(item) => {
                        items.push(item);
                        early.push(None);
                    }
                    Err(e) => early.push(Some(e)),
                }
            }
            let mut issued = state.vault.tokenize(&tenant, items).await?.into_iter();
            let mut results = Vec::with_capacity(early.len());
            for e in early {
                let r = match e {
                    Some(e) => Err(e),
                    None => issued
                        .next()
                        .unwrap_or(Err(crate::vault::VaultError::TokenSpaceExhausted))
                        .map_err(ApiError::from),
                };
                results.push(r.map(|t| TokenView {
                    token: t.token,
                    format: t.format,
                    expires_at: t.expires_at,
                }));
            }
            trail.count = Some(results.len() as u64);
            if action == Action::Tokenize {
                return match results.pop() {
                    Some(Ok(view)) => Ok(json_ok(&view)),
                    Some(Err(e)) => Err(e),
                    None => Err(ApiError::Internal),
                };
            }
            let mut out = Vec::with_capacity(results.len());
            for r in results {
                out.push(match r {
                    Ok(v) => ItemResult::Ok(v),
                    Err(e) => item_error(e)?,
                });
            }
            Ok(json_ok(&Results { results: out }))
        }
        Action::Reveal => {
            let req: RevealBody = parse_json(&body)?;
            check_batch(state, req.tokens.len())?;
            let mask = match req.mask.as_deref() {
                None => false,
                Some("last4") => true,
                Some(other) => {
                    return Err(ApiError::InvalidRequest(format!(
                        "unknown mask {other:?} (known: last4)"
                    )));
                }
            };
            if !mask && !principal.may(Operation::Reveal, &tenant) {
                return Err(ApiError::Forbidden);
            }
            trail.operation = Some(if mask { "reveal.masked" } else { "reveal" });
            trail.count = Some(req.tokens.len() as u64);
            let values = state.vault.reveal(&tenant, &req.tokens, mask).await?;
            let found = values.iter().filter(|v| v.is_ok()).count() as u64;
            // Every reveal is on disk before any value leaves (fail closed).
            let record = Record {
                operation: trail.operation.unwrap_or("reveal").to_owned(),
                outcome: "ok".into(),
                request_id: Some(request_id.to_owned()),
                principal: trail.principal.clone(),
                peer: Some(peer.to_string()),
                tenant: trail.tenant.clone(),
                count: Some(found),
                detail: Some(format!(
                    "{} tokens asked, {found} revealed",
                    req.tokens.len()
                )),
                ..Record::default()
            };
            state.audit.admin(record).await.map_err(|e| {
                tracing::error!(%request_id, error = %e, "audit log unavailable; refusing a reveal");
                ApiError::AuditUnavailable
            })?;
            trail.operation = None;
            let mut out = Vec::with_capacity(values.len());
            for v in &values {
                out.push(match v {
                    Ok(s) => ItemResult::Ok(RevealedValue { value: s }),
                    Err(e) => item_error(ApiError::from(e.clone()))?,
                });
            }
            Ok(secret_body(&serde_json::json!({ "values": out })))
        }
        Action::DeleteToken => {
            let token = token_param.unwrap_or_default();
            trail.count = Some(1);
            state.vault.delete(&tenant, &token).await?;
            Ok(json_ok(&serde_json::json!({ "deleted": true })))
        }
        Action::SetRoot => {
            let req: SetRootRequest = parse_json(&body)?;
            let root = crate::providers::aws_kms_root_id(&req.aws_kms_key)
                .map_err(|m| ApiError::InvalidRequest(format!("aws_kms_key: {m}")))?;
            gate(state, peer, request_id, trail, format!("set root {root}")).await?;
            let moved = kr.set_root(&tenant, &root).await?;
            trail.count = Some(moved.rewrapped);
            Ok(json_ok(&RootMoveView {
                tenant: TenantView::from(&moved.tenant),
                versions: moved.versions,
                rewrapped: moved.rewrapped,
            }))
        }
        Action::Shred => {
            let req: ShredRequest = if empty_body {
                ShredRequest::default()
            } else {
                parse_json(&body)?
            };
            let target = match req.version {
                Some(v) => ShredTarget::Version(v),
                None => ShredTarget::Tenant,
            };
            trail.key_version = req.version;
            gate(state, peer, request_id, trail, "request shred".into()).await?;
            let approval = kr
                .request_shred(&tenant, target, &principal.name, state.shred_window)
                .await?;
            let view = ApprovalView::from(&approval);
            trail.approval = Some(approval);
            let mut resp = json_ok(&view);
            *resp.status_mut() = StatusCode::ACCEPTED;
            Ok(resp)
        }
    }
}

async fn seal_item(
    state: &AppState,
    tenant: &TenantId,
    item: SealItem<'_>,
) -> Result<Sealed, ApiError> {
    let (ct, key_version) = seal_raw(state, tenant, item).await?;
    Ok(Sealed {
        ciphertext: b64::encode(ct),
        key_version,
    })
}

/// Seals one item; returns the envelope's bytes and the key version.
async fn seal_raw(
    state: &AppState,
    tenant: &TenantId,
    item: SealItem<'_>,
) -> Result<(Vec<u8>, u32), ApiError> {
    // Decoded straight into the envelope's buffer (sealed in place), into room reserved for the
    // decoder's upper bound, so no copy of the plaintext is left behind.
    let text = item.plaintext.expose_bytes();
    let len = b64::decoded_len(text).map_err(|_| ApiError::InvalidBase64("plaintext"))?;
    let mut plaintext = SealBuffer::with_capacity(len);
    plaintext
        .append_with(len, |room| b64::decode_into(text, room))
        .map_err(|_| ApiError::InvalidBase64("plaintext"))?;
    let aad = optional_b64("aad", item.aad.as_deref())?;
    Ok(state
        .keyring
        .seal_buffer(tenant, Purpose::Data, &aad, plaintext)
        .await?)
}

async fn open_item(
    state: &AppState,
    tenant: &TenantId,
    item: OpenItem<'_>,
) -> Result<SecretBytes, ApiError> {
    let ct = decode("ciphertext", item.ciphertext.as_bytes())?;
    let aad = optional_b64("aad", item.aad.as_deref())?;
    Ok(state
        .keyring
        .open_owned(tenant, Purpose::Data, &aad, ct)
        .await?)
}

async fn rewrap_item(
    state: &AppState,
    tenant: &TenantId,
    item: OpenItem<'_>,
) -> Result<Sealed, ApiError> {
    let ct = decode("ciphertext", item.ciphertext.as_bytes())?;
    let aad = optional_b64("aad", item.aad.as_deref())?;
    let (ct, key_version) = state
        .keyring
        .rewrap(tenant, Purpose::Data, &aad, &ct)
        .await?;
    Ok(Sealed {
        ciphertext: b64::encode(ct),
        key_version,
    })
}

/// Per-item failures that concern the item stay in the item; failures of the service (store or
/// root down) fail the whole batch, since every later item would fail the same way.
fn item_error<T>(e: ApiError) -> Result<ItemResult<T>, ApiError> {
    let (status, code) = e.status_and_code();
    let whole_request = status.is_server_error()
        || matches!(code, "forbidden" | "tenant_not_found" | "tenant_destroyed");
    if whole_request {
        return Err(e);
    }
    Ok(ItemResult::Err {
        error: ItemError {
            code,
            message: e.to_string(),
        },
    })
}

fn batch_open_response(
    opened: Vec<Result<SecretBytes, ApiError>>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let encoded: Vec<Result<Zeroizing<String>, ApiError>> = opened
        .into_iter()
        .map(|r| r.map(|pt| Zeroizing::new(b64::encode(pt.expose()))))
        .collect();
    let mut results = Vec::with_capacity(encoded.len());
    for r in &encoded {
        results.push(match r {
            Ok(s) => ItemResult::Ok(Opened { plaintext: s }),
            Err(e) => item_error(e.clone())?,
        });
    }
    Ok(secret_body(&Results { results }))
}

/// Feeds arbitrary bytes to every request-body parser the API has, for the fuzz target: none
/// may panic, and no error message may quote the input's values.
#[doc(hidden)]
pub fn fuzz_request_bodies(data: &[u8]) {
    fn check<'a, T: Deserialize<'a>>(data: &'a [u8]) {
        if let Err(e) = parse_json::<T>(data) {
            let (_, code) = e.status_and_code();
            assert_eq!(code, "invalid_request");
        }
    }
    check::<SealItem>(data);
    check::<OpenItem>(data);
    check::<Batch<SealItem>>(data);
    check::<Batch<OpenItem>>(data);
    check::<DatakeyRequest>(data);
    check::<DatakeyUnwrapRequest>(data);
    check::<RetireRequest>(data);
    check::<ShredRequest>(data);
    check::<TokenizeBody>(data);
    check::<Batch<TokenizeBody>>(data);
    check::<RevealBody>(data);
    if let Ok(b) = parse_json::<TokenizeBody>(data) {
        let _ = tokenize_item(b);
    }
    if let Ok(item) = parse_json::<SealItem>(data) {
        let _ = decode("plaintext", item.plaintext.expose_bytes());
    }
}

fn tokenize_item(b: TokenizeBody) -> Result<crate::vault::TokenizeItem, ApiError> {
    use crate::vault::format::Format;
    let keep_domain = match b.email_domain.as_deref() {
        None | Some("keep") => true,
        Some("tokenize") => false,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "email_domain must be keep or tokenize, not {other:?}"
            )));
        }
    };
    let format = match b.format.as_deref().unwrap_or("opaque") {
        "opaque" => Format::Opaque,
        "digits" => Format::Digits,
        "card" => Format::Card,
        "email" => Format::Email { keep_domain },
        other => {
            return Err(ApiError::InvalidRequest(format!(
                "unknown format {other:?} (known: opaque, digits, card, email)"
            )));
        }
    };
    let ttl = match b.ttl_seconds {
        None => None,
        Some(s) if (1..=10 * 365 * 86_400).contains(&s) => Some(std::time::Duration::from_secs(s)),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "ttl_seconds must be between 1 and ten years".into(),
            ));
        }
    };
    Ok(crate::vault::TokenizeItem {
        value: Zeroizing::new(b.value.expose_secret().to_owned()),
        format,
        deterministic: b.deterministic,
        ttl,
    })
}

fn check_batch(state: &AppState, n: usize) -> Result<(), ApiError> {
    let max = state.limits.max_batch_items;
    if n > max {
        return Err(ApiError::BatchTooLarge { max });
    }
    Ok(())
}

// ---- helpers for bodies ----

fn request_id(req: &Request<Incoming>) -> String {
    if let Some(v) = req.headers().get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
        {
            // Checked ASCII above, so this is infallible.
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    next_request_id()
}

/// A random per-process prefix and a counter: unique without a system call per request.
fn next_request_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut raw = [0u8; 8];
        match crate::crypto::fill_random(&mut raw) {
            Ok(()) => hex::encode(raw),
            Err(_) => format!("{:016x}", std::process::id()),
        }
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    request_id_from(prefix, n)
}

/// `format!("{prefix}{n:08x}")` without the formatting machinery (about 1 % of a 1 KiB seal).
fn request_id_from(prefix: &str, n: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // At least 8 digits, as `{:08x}` pads; more once the counter passes 2^32.
    let digits = (64 - (n | 0xffff_ffff).leading_zeros()).div_ceil(4);
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    for i in (0..digits).rev() {
        id.push(char::from(HEX[((n >> (i * 4)) & 0xf) as usize]));
    }
    id
}

async fn read_body(
    req: Request<Incoming>,
    max: usize,
    headroom: usize,
) -> Result<SecretVec, ApiError> {
    let declared = match req.headers().get(CONTENT_LENGTH) {
        Some(len) => {
            let len: usize = std::str::from_utf8(len.as_bytes())
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| ApiError::InvalidRequest("bad content-length".into()))?;
            if len > max {
                return Err(ApiError::BodyTooLarge { max });
            }
            len
        }
        None => 0,
    };
    // With headroom the buffer becomes an envelope: keep room for its tag too.
    let tail = if headroom > 0 {
        crate::crypto::envelope::TAG_LEN
    } else {
        0
    };
    // The declared length is trusted only up to 1 MiB before bytes arrive: a caller that
    // declares 4 MiB and stalls does not get 4 MiB reserved (and wiped) for nothing.
    let upfront = declared.min(1 << 20);
    let mut buf = SecretVec::with_capacity(headroom.saturating_add(upfront).saturating_add(tail));
    buf.resize(headroom, 0);
    let mut body = req.into_body();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|_| ApiError::InvalidRequest("could not read the request body".into()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if (buf.len() - headroom).saturating_add(data.len()) > max {
                return Err(ApiError::BodyTooLarge { max });
            }
            // Bounded by the checks above (and max_body_bytes ≤ 1 GiB): cannot overflow.
            let needed = buf.len() + data.len() + tail;
            if needed > buf.capacity() {
                // Grow by hand so the old buffer is zeroized, not freed with body bytes in it.
                let cap = needed
                    .max(buf.capacity().saturating_mul(2))
                    .min(headroom + max + tail);
                let mut grown = SecretVec::with_capacity(cap);
                grown.extend_from_slice(&buf);
                buf = grown;
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    // A body trickled byte by byte must not hold the request (and its in-flight slot) forever.
    tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::InvalidRequest("the request body arrived too slowly".into()))??;
    Ok(buf)
}

/// Parses JSON without ever echoing input values: serde's messages for type errors can quote
/// the offending value (a plaintext), so only field-shape messages are passed on.
fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let shape = msg.starts_with("unknown field") || msg.starts_with("missing field");
        if shape {
            let head = msg
                .split(" at line")
                .next()
                .unwrap_or("invalid request body");
            ApiError::InvalidRequest(head.to_owned())
        } else if e.is_syntax() || e.is_eof() {
            ApiError::InvalidRequest(format!(
                "request body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        } else {
            ApiError::InvalidRequest(format!(
                "request body does not match the schema (line {}, column {})",
                e.line(),
                e.column()
            ))
        }
    })
}

fn decode(field: &'static str, text: &[u8]) -> Result<SecretVec, ApiError> {
    b64::decode(text).map_err(|_| ApiError::InvalidBase64(field))
}

fn optional_b64(field: &'static str, text: Option<&str>) -> Result<SecretVec, ApiError> {
    match text {
        Some(s) => decode(field, s.as_bytes()),
        None => Ok(SecretVec::new()),
    }
}

/// A body whose bytes are zeroized when hyper drops the last reference to them.
fn zeroizing_bytes(v: SecretVec) -> Bytes {
    Bytes::from_owner(v)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn json_ok<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(v) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => error_response(&ApiError::Internal, "unknown"),
    }
}

/// `{"plaintext":"<base64>"}`, written straight into one zeroizing buffer of the exact size
/// (base64 needs no JSON escaping).
fn opened_response(plaintext: &[u8]) -> Response<Full<Bytes>> {
    const HEAD: &[u8] = br#"{"plaintext":""#;
    const TAIL: &[u8] = br#""}"#;
    let encoded = b64::encoded_len(plaintext.len()).unwrap_or(usize::MAX);
    let mut buf = SecretVec::from(vec![
        0u8;
        HEAD.len()
            .saturating_add(encoded)
            .saturating_add(TAIL.len())
    ]);
    buf[..HEAD.len()].copy_from_slice(HEAD);
    let end = match b64::encode_into(plaintext, &mut buf[HEAD.len()..]) {
        Ok(n) => HEAD.len() + n,
        Err(_) => return error_response(&ApiError::Internal, "unknown"),
    };
    buf[end..end + TAIL.len()].copy_from_slice(TAIL);
    let mut resp = Response::new(Full::new(zeroizing_bytes(buf)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

/// `{"ciphertext":"<base64>","key_version":N}`, the envelope encoded straight into the body.
fn sealed_response(ciphertext: &[u8], key_version: u32) -> Result<Response<Full<Bytes>>, ApiError> {
    use std::io::Write;
    const HEAD: &[u8] = br#"{"ciphertext":""#;
    let encoded = b64::encoded_len(ciphertext.len()).ok_or(ApiError::Internal)?;
    // The tail is `","key_version":` and at most 10 digits and a brace.
    let mut body = Vec::with_capacity(HEAD.len() + encoded + 32);
    body.extend_from_slice(HEAD);
    body.resize(HEAD.len() + encoded, 0);
    let n =
        b64::encode_into(ciphertext, &mut body[HEAD.len()..]).map_err(|_| ApiError::Internal)?;
    body.truncate(HEAD.len() + n);
    write!(body, r#"","key_version":{key_version}}}"#).map_err(|_| ApiError::Internal)?;
    Ok(json_response(StatusCode::OK, body))
}

/// Counts what a serialisation would write, so secret buffers are allocated once, exactly.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// JSON carrying secrets: serialised into a zeroizing buffer sized up front, so no
/// reallocation leaves a partial copy behind.
fn secret_body<T: Serialize>(v: &T) -> Response<Full<Bytes>> {
    let mut size = Counter(0);
    if serde_json::to_writer(&mut size, v).is_err() {
        return error_response(&ApiError::Internal, "unknown");
    }
    let mut buf = SecretVec::with_capacity(size.0);
    if serde_json::to_writer(&mut *buf, v).is_err() {
        return error_response(&ApiError::Internal, "unknown");
    }
    let mut resp = Response::new(Full::new(zeroizing_bytes(buf)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

pub fn error_response(e: &ApiError, request_id: &str) -> Response<Full<Bytes>> {
    let (status, code) = e.status_and_code();
    let body = serde_json::json!({
        "error": { "code": code, "message": e.to_string(), "request_id": request_id }
    });
    let mut resp = json_response(status, serde_json::to_vec(&body).unwrap_or_default());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;

    async fn body_of(r: Response<Full<Bytes>>) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    /// The hand-written seal and open answers are byte for byte what serde_json writes.
    #[tokio::test]
    async fn direct_json_answers_match_serde() {
        for n in [0usize, 1, 2, 3, 64, 1000, 4099] {
            let pt: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let b64 = B64.encode(&pt);
            let want = serde_json::to_vec(&Opened { plaintext: &b64 }).unwrap();
            assert_eq!(body_of(opened_response(&pt)).await, want, "open, {n} bytes");
            for key_version in [1, n as u32 + 1, u32::MAX] {
                let sealed = Sealed {
                    ciphertext: b64.clone(),
                    key_version,
                };
                let want = serde_json::to_vec(&sealed).unwrap();
                assert_eq!(
                    body_of(sealed_response(&pt, key_version).unwrap()).await,
                    want,
                    "seal, {n} bytes, version {key_version}"
                );
            }
        }
    }

    #[test]
    fn request_ids_are_formatted_as_before() {
        for n in [
            0,
            1,
            0xf,
            0xabc,
            0xffff_ffff,
            0x1_0000_0000,
            0x1234_5678_9abc,
            u64::MAX,
        ] {
            assert_eq!(request_id_from("a1b2", n), format!("a1b2{n:08x}"), "{n:#x}");
        }
        proptest::proptest!(|(n: u64)| {
            proptest::prop_assert_eq!(request_id_from("", n), format!("{n:08x}"));
        });
    }

    #[test]
    fn generated_request_ids_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(next_request_id()));
        }
    }

    use super::*;

    #[test]
    fn routes_parse_every_template() {
        assert_eq!(route("/healthz"), Some(Route::Healthz));
        assert_eq!(route("/metrics"), Some(Route::Metrics));
        assert_eq!(
            route("/v1/tenants/acme/root"),
            Some(Route::Tenant {
                tenant: "acme",
                action: Action::SetRoot
            })
        );
        assert_eq!(
            route("/v1/tenants/acme/seal:batch"),
            Some(Route::Tenant {
                tenant: "acme",
                action: Action::SealBatch
            })
        );
        assert_eq!(
            route("/v1/tenants/acme:shred"),
            Some(Route::Tenant {
                tenant: "acme",
                action: Action::Shred
            })
        );
        assert_eq!(
            route("/v1/approvals/apr_1:approve"),
            Some(Route::Approve { id: "apr_1" })
        );
        assert_eq!(route("/v1/approvals/apr_1"), None);
        assert_eq!(
            route("/v1/tenants/a%2Fb/open"),
            Some(Route::Tenant {
                tenant: "a%2Fb",
                action: Action::Open
            })
        );
        assert_eq!(route("/v1/tenants/acme/seal/extra"), None);
        assert_eq!(route("/v1/tenants/acme"), None);
        assert_eq!(route("/v2/tenants/acme/seal"), None);
        for (_, template) in ROUTES {
            let path = template
                .replace("{tenant}", "t")
                .replace("{id}", "apr_1")
                .replace("{token}", "tok_x");
            assert!(route(&path).is_some(), "{template}");
        }
    }

    /// Every route of the router is in the OpenAPI document, and nothing else is.
    #[test]
    fn openapi_document_lists_exactly_the_router_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: std::collections::BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn json_errors_never_quote_values() {
        let secret = "c2VjcmV0LXZhbHVlLTEyMw==";
        let body = format!(r#"{{"plaintext": 5, "aad": "{secret}", "x": 1}}"#);
        let e = parse_json::<SealItem>(body.as_bytes())
            .map(|_| ())
            .unwrap_err();
        assert!(!e.to_string().contains(secret), "{e}");
        let body = format!(r#"{{"ciphertext": ["{secret}"]}}"#);
        let e = parse_json::<OpenItem>(body.as_bytes())
            .map(|_| ())
            .unwrap_err();
        assert!(!e.to_string().contains(secret), "{e}");
        let e = parse_json::<OpenItem>(br#"{"ciphertext":"AA==","bogus":1}"#)
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().starts_with("unknown field `bogus`"), "{e}");
    }

    /// Base64 fields are borrowed from the body; a field with JSON escapes (legal, if odd, for
    /// base64's `/`) is unescaped into a zeroizing copy and means the same bytes.
    #[test]
    fn seal_and_open_fields_borrow_unless_escaped() {
        let plain = br#"{"plaintext":"a/b+QUJD","aad":"QUJD"}"#;
        let item = parse_json::<SealItem>(plain).unwrap();
        assert!(matches!(item.plaintext, SecretText::Borrowed(_)));
        assert!(matches!(item.aad, Some(Text(Cow::Borrowed("QUJD")))));
        assert_eq!(item.plaintext.expose_bytes(), b"a/b+QUJD");
        let escaped = br#"{"plaintext":"a\/b+QUJD","aad":"QU\u004aD"}"#;
        let item = parse_json::<SealItem>(escaped).unwrap();
        assert!(matches!(item.plaintext, SecretText::Owned(_)));
        assert_eq!(item.plaintext.expose_bytes(), b"a/b+QUJD");
        assert_eq!(item.aad.as_deref(), Some("QUJD"));
        assert_eq!(format!("{:?}", item.plaintext), "SecretText([REDACTED])");
        let item = parse_json::<OpenItem>(br#"{"ciphertext":"AA\/="}"#).unwrap();
        assert!(matches!(item.ciphertext, Text(Cow::Owned(_))));
        assert_eq!(&*item.ciphertext, "AA/=");
        let item = parse_json::<OpenItem>(br#"{"ciphertext":"AA==","aad":"QUJD"}"#).unwrap();
        assert!(matches!(item.ciphertext, Text(Cow::Borrowed("AA=="))));
        assert!(matches!(item.aad, Some(Text(Cow::Borrowed("QUJD")))));
        let item = parse_json::<Batch<SealItem>>(br#"{"items":[{"plaintext":"AA=="}]}"#).unwrap();
        assert!(matches!(
            item.items[0].plaintext,
            SecretText::Borrowed("AA==")
        ));
        let e = parse_json::<SealItem>(br#"{"plaintext":null}"#)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.status_and_code().1, "invalid_request");
    }
}
