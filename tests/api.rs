//! The running sidecar's HTTP API: round trips, failure codes, limits, access control, metrics.

mod support;

use serde_json::json;
use support::*;

const SEAL: &str = "/v1/tenants/acme/seal";
const OPEN: &str = "/v1/tenants/acme/open";

async fn seal(s: &Sidecar, tenant: &str, pt: &[u8], aad: Option<&[u8]>) -> String {
    let mut body = json!({ "plaintext": b64(pt) });
    if let Some(a) = aad {
        body["aad"] = json!(b64(a));
    }
    let r = s.post(&format!("/v1/tenants/{tenant}/seal"), body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["key_version"], 1);
    r.str("ciphertext")
}

#[tokio::test]
async fn seal_then_open_round_trips_over_the_socket() {
    let s = Sidecar::start().await;
    let ct = seal(&s, "acme", b"card 4111 1111 1111 1111", Some(b"order-7")).await;
    let raw = unb64(&ct);
    assert_eq!(raw.len(), 24 + 86);
    assert_eq!(&raw[..6], &[1, 1, 0, 0, 0, 1]);
    let r = s
        .post(OPEN, json!({ "ciphertext": ct, "aad": b64(b"order-7") }))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(unb64(&r.str("plaintext")), b"card 4111 1111 1111 1111");
}

#[tokio::test]
async fn octet_stream_round_trips_with_aad_header() {
    let s = Sidecar::start().await;
    // Above the size that moves sealing off the reactor and is sealed in place.
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let aad = b64(b"ctx");
    let r = s
        .unix(
            "POST",
            SEAL,
            &[
                ("content-type", "application/octet-stream"),
                ("x-kms-aad", &aad),
            ],
            payload.clone(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-key-version"], "1");
    assert_eq!(r.body.len(), payload.len() + 86);
    let ct = r.body.clone();
    let r = s
        .unix(
            "POST",
            OPEN,
            &[
                ("content-type", "application/octet-stream"),
                ("x-kms-aad", &aad),
            ],
            ct.clone(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &payload[..]);
    // Without the AAD the same bytes do not open.
    let r = s
        .unix(
            "POST",
            OPEN,
            &[("content-type", "application/octet-stream")],
            ct,
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "decrypt_failed"));
}

#[tokio::test]
async fn every_failed_open_is_decrypt_failed() {
    let s = Sidecar::start().await;
    let ct = seal(&s, "acme", b"secret", Some(b"aad")).await;
    let _ = seal(&s, "other", b"x", None).await;
    let raw = unb64(&ct);
    let mut flipped = raw.clone();
    flipped[80] ^= 1;
    let mut other_version = raw.clone();
    other_version[5] = 2;
    let mut extended = raw.clone();
    extended.push(0);
    let cases: Vec<(&str, String, &[u8])> = vec![
        ("another tenant", "/v1/tenants/other/open".into(), b"aad"),
        ("another aad", OPEN.into(), b"aaD"),
        ("no aad", OPEN.into(), b""),
    ];
    for (what, path, aad) in cases {
        let r = s
            .post(&path, json!({ "ciphertext": ct, "aad": b64(aad) }))
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "decrypt_failed"),
            "{what}"
        );
        assert_eq!(r.json()["error"]["message"], "decryption failed", "{what}");
    }
    for (what, bytes) in [
        ("flipped bit", flipped),
        ("another key version", other_version),
        ("extended", extended),
        ("truncated", raw[..raw.len() - 1].to_vec()),
        ("short", raw[..20].to_vec()),
        ("empty", vec![]),
    ] {
        let r = s
            .post(
                OPEN,
                json!({ "ciphertext": b64(&bytes), "aad": b64(b"aad") }),
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "decrypt_failed"),
            "{what}"
        );
    }
}

#[tokio::test]
async fn bad_input_gets_stable_codes_and_leaves_the_store_unchanged() {
    let s = Sidecar::start().await;
    let _ = seal(&s, "acme", b"x", None).await;
    let before = s.snapshot().await;
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "bad base64",
            "/v1/tenants/fresh/seal".into(),
            r#"{"plaintext":"!!!"}"#.into(),
            400,
            "invalid_base64",
        ),
        (
            "bad aad base64",
            "/v1/tenants/fresh/seal".into(),
            r#"{"plaintext":"AA==","aad":"%"}"#.into(),
            400,
            "invalid_base64",
        ),
        (
            "missing field",
            "/v1/tenants/fresh/seal".into(),
            r#"{}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            "/v1/tenants/fresh/seal".into(),
            r#"{"plaintext":"AA==","tenant":"x"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "not json",
            "/v1/tenants/fresh/seal".into(),
            "plaintext=AA".into(),
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            "/v1/tenants/fresh/seal".into(),
            r#"{"plaintext":12}"#.into(),
            400,
            "invalid_request",
        ),
        (
            "bad ciphertext base64",
            OPEN.into(),
            r#"{"ciphertext":"@@"}"#.into(),
            400,
            "invalid_base64",
        ),
        (
            "tenant with slash",
            "/v1/tenants/a%2Fb/seal".into(),
            r#"{"plaintext":"AA=="}"#.into(),
            400,
            "invalid_tenant",
        ),
        (
            "tenant too long",
            format!("/v1/tenants/{}/seal", "x".repeat(129)),
            r#"{"plaintext":"AA=="}"#.into(),
            400,
            "invalid_tenant",
        ),
        (
            "tenant with colon",
            "/v1/tenants/a:b/seal".into(),
            r#"{"plaintext":"AA=="}"#.into(),
            400,
            "invalid_tenant",
        ),
        (
            "empty tenant",
            "/v1/tenants//seal".into(),
            r#"{"plaintext":"AA=="}"#.into(),
            400,
            "invalid_tenant",
        ),
        (
            "unknown route",
            "/v1/tenants/acme/encrypt".into(),
            "{}".into(),
            404,
            "not_found",
        ),
    ];
    for (what, path, body, status, code) in cases {
        let r = s
            .unix("POST", &path, &[("content-type", "application/json")], body)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{what}: {:?}",
            r.body
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let r = s.unix("GET", SEAL, &[], "").await;
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    let oversize = format!(r#"{{"plaintext":"{}"}}"#, "A".repeat(4 * 1024 * 1024 + 4));
    let r = s
        .unix(
            "POST",
            "/v1/tenants/fresh/seal",
            &[("content-type", "application/json")],
            oversize,
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
    let r = s
        .unix(
            "POST",
            "/v1/tenants/fresh/datakey",
            &[("content-type", "application/octet-stream")],
            "x",
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    assert_eq!(
        s.snapshot().await,
        before,
        "rejected requests must not touch the store"
    );
}

#[tokio::test]
async fn body_limit_is_configurable() {
    let s = Sidecar::start_with(Options {
        extra_toml: "[limits]\nmax_body_bytes = 100\n".into(),
        ..Options::default()
    })
    .await;
    let r = s.post(SEAL, json!({ "plaintext": b64(&[0; 40]) })).await;
    assert_eq!(r.status, 200);
    let r = s.post(SEAL, json!({ "plaintext": b64(&[0; 80]) })).await;
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
}

#[tokio::test]
async fn access_is_denied_by_default() {
    let s = Sidecar::start().await;
    let body = json!({ "plaintext": "AA==" }).to_string();
    let r = s
        .tcp(None, "POST", "/v1/tenants/a-1/seal", body.clone())
        .await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = s
        .tcp(
            Some("not-a-token"),
            "POST",
            "/v1/tenants/a-1/seal",
            body.clone(),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthenticated"));
    let r = s
        .tcp(Some(TOKEN_A), "POST", "/v1/tenants/a-1/seal", body.clone())
        .await;
    assert_eq!(r.status, 200);
    let ct = r.str("ciphertext");
    // Tenant A's token on tenant B.
    let r = s
        .tcp(Some(TOKEN_A), "POST", "/v1/tenants/b-1/seal", body.clone())
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    // An operation the principal does not hold.
    let r = s
        .tcp(
            Some(TOKEN_SEAL_ONLY),
            "POST",
            "/v1/tenants/a-1/open",
            json!({ "ciphertext": ct }).to_string(),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = s
        .tcp(Some(TOKEN_SEAL_ONLY), "POST", "/v1/tenants/a-1/seal", body)
        .await;
    assert_eq!(r.status, 200);
    // Forbidden even for tenants that do not exist: no oracle on existence.
    let r = s
        .tcp(Some(TOKEN_A), "GET", "/v1/tenants/zzz/keys", "")
        .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
}

#[tokio::test]
async fn socket_peer_not_in_config_is_forbidden() {
    let s = Sidecar::start_with(Options {
        socket_uid: None,
        ..Options::default()
    })
    .await;
    let r = s.post(SEAL, json!({ "plaintext": "AA==" })).await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    // A valid token on the socket identifies the caller explicitly.
    let auth = format!("Bearer {TOKEN_ADMIN}");
    let r = s
        .unix(
            "POST",
            SEAL,
            &[("authorization", &auth)],
            json!({ "plaintext": "AA==" }).to_string(),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn unknown_tenant_is_404_without_auto_create() {
    let s = Sidecar::start_with(Options {
        auto_create: false,
        ..Options::default()
    })
    .await;
    for (path, body) in [
        (SEAL, json!({ "plaintext": "AA==" })),
        ("/v1/tenants/acme/datakey", json!({})),
        (OPEN, json!({ "ciphertext": b64(&[1u8; 100]) })),
    ] {
        let r = s.post(path, body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (404, "tenant_not_found"),
            "{path}"
        );
    }
    let r = s.unix("GET", "/v1/tenants/acme/keys", &[], "").await;
    assert_eq!((r.status, r.code().as_str()), (404, "tenant_not_found"));
    assert_eq!(s.snapshot().await, "");
}

#[tokio::test]
async fn concurrent_first_use_creates_exactly_one_key_version() {
    let s = std::sync::Arc::new(Sidecar::start().await);
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .post("/v1/tenants/newco/seal", json!({ "plaintext": b64(&[i]) }))
                .await;
            assert_eq!(r.status, 200);
            r.json()["key_version"].as_u64().unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1);
    }
    let r = s.unix("GET", "/v1/tenants/newco/keys", &[], "").await;
    let versions = r.json()["versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["state"], "active");
}

#[tokio::test]
async fn batches_report_per_item_results() {
    let s = Sidecar::start().await;
    let r = s
        .post(
            "/v1/tenants/acme/seal:batch",
            json!({ "items": [ { "plaintext": b64(b"one") }, { "plaintext": "!!" }, { "plaintext": b64(b"three"), "aad": b64(b"c") } ] }),
        )
        .await;
    assert_eq!(r.status, 200);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3);
    assert_eq!(results[1]["error"]["code"], "invalid_base64");
    let c0 = results[0]["ciphertext"].as_str().unwrap().to_owned();
    let c2 = results[2]["ciphertext"].as_str().unwrap().to_owned();
    let r = s
        .post(
            "/v1/tenants/acme/open:batch",
            json!({ "items": [ { "ciphertext": c0 }, { "ciphertext": c2 }, { "ciphertext": c2, "aad": b64(b"c") } ] }),
        )
        .await;
    assert_eq!(r.status, 200);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(unb64(results[0]["plaintext"].as_str().unwrap()), b"one");
    assert_eq!(results[1]["error"]["code"], "decrypt_failed");
    assert_eq!(unb64(results[2]["plaintext"].as_str().unwrap()), b"three");
    let many: Vec<_> = (0..1001).map(|_| json!({ "plaintext": "AA==" })).collect();
    let r = s
        .post("/v1/tenants/acme/seal:batch", json!({ "items": many }))
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "batch_too_large"));
}

#[tokio::test]
async fn datakeys_unwrap_only_as_datakeys() {
    let s = Sidecar::start().await;
    let r = s
        .post("/v1/tenants/acme/datakey", json!({ "aad": b64(b"file-9") }))
        .await;
    assert_eq!(r.status, 200);
    let key = unb64(&r.str("plaintext_key"));
    assert_eq!(key.len(), 32);
    let wrapped = r.str("wrapped_key");
    let r = s
        .post(
            "/v1/tenants/acme/datakey:unwrap",
            json!({ "wrapped_key": wrapped, "aad": b64(b"file-9") }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(unb64(&r.str("plaintext_key")), key);
    // A wrapped data key is not an ordinary ciphertext, and the other way round.
    let r = s
        .post(
            OPEN,
            json!({ "ciphertext": wrapped, "aad": b64(b"file-9") }),
        )
        .await;
    assert_eq!(r.code(), "decrypt_failed");
    let ct = seal(&s, "acme", &key, None).await;
    let r = s
        .post(
            "/v1/tenants/acme/datakey:unwrap",
            json!({ "wrapped_key": ct }),
        )
        .await;
    assert_eq!(r.code(), "decrypt_failed");
    // An empty body is an empty request.
    let r = s.unix("POST", "/v1/tenants/acme/datakey", &[], "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn keys_listing_shows_versions_and_roots_not_key_bytes() {
    let s = Sidecar::start().await;
    let _ = seal(&s, "acme", b"x", None).await;
    let r = s.unix("GET", "/v1/tenants/acme/keys", &[], "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["active_version"], 1);
    let root = v["versions"][0]["roots"][0].as_str().unwrap().to_owned();
    assert!(root.starts_with("keyfile:"), "{root}");
    let snapshot = s.snapshot().await;
    let blob_hex = snapshot.split(&format!("{root}=")).nth(1).unwrap().trim();
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains(blob_hex));
    assert!(!text.contains(&b64(&hex::decode(blob_hex).unwrap())));
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let s = Sidecar::start().await;
    let r = s
        .unix(
            "POST",
            OPEN,
            &[("x-request-id", "trace-42")],
            r#"{"ciphertext":"AA=="}"#,
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-42");
    assert_eq!(r.json()["error"]["request_id"], "trace-42");
    let r = s
        .unix(
            "POST",
            OPEN,
            &[("x-request-id", "bad id with spaces")],
            r#"{"ciphertext":"AA=="}"#,
        )
        .await;
    let made = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 24);
    assert_eq!(r.json()["error"]["request_id"], made.as_str());
}

#[tokio::test]
async fn health_and_readiness() {
    let s = Sidecar::start().await;
    let r = s.unix("GET", "/healthz", &[], "").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = s.tcp(None, "GET", "/readyz", "").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("ready"))
    );
}

#[tokio::test]
async fn socket_is_mode_0660() {
    use std::os::unix::fs::PermissionsExt;
    let s = Sidecar::start().await;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[tokio::test]
async fn store_files_hold_no_plaintext_key_or_value() {
    use kms_sidecar::keyring::KeyringStore;
    use kms_sidecar::providers::keyfile::{KeyfileRoot, parse_keyfile};
    use kms_sidecar::providers::{RootProvider, WrapContext, WrapPurpose};
    use kms_sidecar::tenant::TenantId;

    let s = Sidecar::start().await;
    let value = b"4111-1111-1111-1111 / jane@example.com";
    let _ = seal(&s, "acme", value, None).await;
    let r = s.post("/v1/tenants/acme/datakey", json!({})).await;
    let issued = unb64(&r.str("plaintext_key"));

    // Recover the tenant's data key the way the sidecar does: the root unwraps the stored wrap.
    let data = s.data_dir();
    let root_key = parse_keyfile(&std::fs::read(data.join("root.key")).unwrap(), None).unwrap();
    let root = KeyfileRoot::from_key(&root_key).unwrap();
    let store = kms_sidecar::store::SqliteStore::open(&data.join("store.db")).unwrap();
    let tenant = TenantId::parse("acme").unwrap();
    let version = store.key_version(&tenant, 1).await.unwrap().unwrap();
    let ctx = WrapContext {
        tenant: &tenant,
        key_version: 1,
        purpose: WrapPurpose::TenantDek,
    };
    let dek = root.unwrap(&version.wrappings[0].blob, &ctx).await.unwrap();

    let mut files = Vec::new();
    for f in std::fs::read_dir(&data).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("store.db")
        {
            files.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    assert!(!files.is_empty());
    let needles: [(&str, &[u8]); 4] = [
        ("data key", dek.expose()),
        ("issued data key", &issued),
        ("root key", &root_key[..]),
        ("sealed value", value),
    ];
    for (path, bytes) in &files {
        for (what, needle) in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{what} found in {}",
                path.display()
            );
        }
    }
    // The wrap itself is there: the grep can find what it looks for.
    let blob = &version.wrappings[0].blob;
    assert!(
        files
            .iter()
            .any(|(_, b)| b.windows(blob.len()).any(|w| w == &blob[..]))
    );
}

#[tokio::test]
async fn metrics_count_and_time_requests_per_operation_and_outcome() {
    let s = Sidecar::start().await;
    let sent = 4;
    let mut sealed = Vec::new();
    for i in 0..sent {
        sealed.push(seal(&s, "acme", format!("value {i}").as_bytes(), None).await);
    }
    for ct in &sealed {
        let r = s.post(OPEN, json!({ "ciphertext": ct })).await;
        assert_eq!(r.status, 200);
    }
    let mut flipped = unb64(&sealed[0]);
    flipped[30] ^= 1;
    let r = s.post(OPEN, json!({ "ciphertext": b64(&flipped) })).await;
    assert_eq!(r.code(), "decrypt_failed");
    let r = s.unix("GET", "/v1/no/such/path", &[], "").await;
    assert_eq!(r.code(), "not_found");
    let r = s.tcp(None, "POST", SEAL, "{}").await;
    assert_eq!(r.code(), "unauthenticated");

    let text = s.metrics().await;
    let v = |series: &str| metric_value(&text, series);
    let requests = |op: &str, outcome: &str| {
        v(&format!(
            r#"kms_sidecar_requests_total{{op="{op}",outcome="{outcome}"}}"#
        ))
    };
    assert_eq!(requests("seal", "ok"), Some(sent as f64), "{text}");
    assert_eq!(requests("open", "ok"), Some(sent as f64));
    assert_eq!(requests("open", "decrypt_failed"), Some(1.0));
    assert_eq!(requests("unknown", "not_found"), Some(1.0));
    assert_eq!(requests("seal", "unauthenticated"), Some(1.0));
    assert_eq!(
        v(r#"kms_sidecar_request_duration_seconds_count{op="seal",outcome="ok"}"#),
        Some(sent as f64)
    );
    assert_eq!(
        v(
            r#"kms_sidecar_request_duration_seconds_bucket{le="+Inf",op="open",outcome="decrypt_failed"}"#
        ),
        Some(1.0)
    );
    // The first seal created the tenant; every open found the tenant and key in the caches.
    assert_eq!(
        v(r#"kms_sidecar_store_duration_seconds_count{op="create_tenant"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"kms_sidecar_store_duration_seconds_count{op="tenant"}"#),
        Some(1.0)
    );
    assert_eq!(
        v(r#"kms_sidecar_store_duration_seconds_count{op="key_version"}"#),
        Some(1.0)
    );
    assert!(v(r#"kms_sidecar_cache_entries{cache="keys"}"#).is_some_and(|n| n >= 1.0));
    assert!(v(r#"kms_sidecar_cache_entries{cache="tenants"}"#).is_some_and(|n| n >= 1.0));
    assert!(v("kms_sidecar_audit_backlog").is_some());
    assert_eq!(v("kms_sidecar_audit_dropped_total"), Some(0.0));
    let generated: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("kms_sidecar_root_call_duration_seconds_count{")
                && l.contains(r#"op="generate""#)
        })
        .collect();
    assert_eq!(generated.len(), 1, "{text}");
    assert!(generated[0].ends_with(" 1"), "{}", generated[0]);
    // No label carries a tenant or a path.
    assert!(!text.contains("acme") && !text.contains("/v1/"), "{text}");
}

#[tokio::test]
async fn metrics_count_open_connections_until_they_close() {
    let s = Sidecar::start().await;
    // Every scrape on one keep-alive connection, so no scrape leaves a closing one behind.
    let stream = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    let (mut scraper, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut open_connections = async move || {
        use http_body_util::BodyExt;
        let req = hyper::Request::get("/metrics")
            .header("host", "localhost")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let body = scraper.send_request(req).await.unwrap().into_body();
        let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        metric_value(&text, "kms_sidecar_open_connections").unwrap()
    };
    assert_eq!(open_connections().await, 1.0);
    let held = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut seen = open_connections().await;
    while seen != 2.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        seen = open_connections().await;
    }
    assert_eq!(seen, 2.0, "the held connection was not counted");
    drop(held);
    while seen != 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        seen = open_connections().await;
    }
    assert_eq!(seen, 1.0, "the closed connection was still counted");
}
