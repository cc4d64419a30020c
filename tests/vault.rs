//! The token vault through the running sidecar and on its store: formats, determinism,
//! least-privilege reveal, tenant isolation, expiry and deletion, erasure, and uniqueness.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

async fn tokenize(s: &Sidecar, tenant: &str, body: Value) -> Reply {
    s.post(&format!("/v1/tenants/{tenant}/tokens"), body).await
}

async fn reveal(
    s: &Sidecar,
    token_auth: Option<&str>,
    tenant: &str,
    tokens: &[&str],
    mask: Option<&str>,
) -> Reply {
    let mut body = json!({ "tokens": tokens });
    if let Some(m) = mask {
        body["mask"] = json!(m);
    }
    match token_auth {
        Some(t) => {
            s.as_token(
                t,
                "POST",
                &format!("/v1/tenants/{tenant}/tokens:reveal"),
                body,
            )
            .await
        }
        None => {
            s.post(&format!("/v1/tenants/{tenant}/tokens:reveal"), body)
                .await
        }
    }
}

fn value_of(r: &Reply, i: usize) -> Value {
    r.json()["values"][i].clone()
}

#[tokio::test]
async fn each_format_round_trips_and_keeps_its_shape() {
    let s = Sidecar::start().await;
    let cases = [
        (json!({ "value": "ya29.a0AfH6SMC-oauth-token" }), "opaque"),
        (
            json!({ "value": "123456789", "format": "digits" }),
            "digits",
        ),
        (
            json!({ "value": "4111 1111 1111 1111", "format": "card" }),
            "card",
        ),
        (
            json!({ "value": "jane.doe@example.com", "format": "email" }),
            "email",
        ),
        (
            json!({ "value": "jane.doe@example.com", "format": "email", "email_domain": "tokenize" }),
            "email-domain",
        ),
    ];
    for (body, format) in cases {
        let r = tokenize(&s, "acme", body.clone()).await;
        assert_eq!(r.status, 200, "{format}: {:?}", r.body);
        let token = r.str("token");
        assert_eq!(r.json()["format"], format);
        let value = body["value"].as_str().unwrap();
        match format {
            "opaque" => assert!(token.starts_with("tok_") && token.len() == 36),
            "digits" => assert!(
                token.len() == 9 && token.bytes().all(|b| b.is_ascii_digit()) && token != value
            ),
            "card" => {
                assert_eq!(token.len(), 16);
                assert!(token.ends_with("1111") && token.starts_with('9'));
            }
            "email" => assert!(token.ends_with("@example.com") && !token.starts_with("jane")),
            _ => assert!(token.ends_with(".invalid") && !token.contains("example")),
        }
        let r = reveal(&s, None, "acme", &[&token], None).await;
        assert_eq!(r.status, 200);
        let expected = if format == "card" {
            "4111111111111111"
        } else {
            value
        };
        assert_eq!(value_of(&r, 0)["value"], expected, "{format}");
    }
}

#[tokio::test]
async fn deterministic_tokens_repeat_and_random_ones_do_not() {
    let s = Sidecar::start().await;
    let det = json!({ "value": "123-45-6789", "deterministic": true });
    let a = tokenize(&s, "acme", det.clone()).await.str("token");
    let b = tokenize(&s, "acme", det.clone()).await.str("token");
    assert_eq!(a, b, "same value, same tenant: same token");
    let other = tokenize(&s, "globex", det.clone()).await.str("token");
    assert_ne!(a, other, "different tenants never share tokens");
    let digits = json!({ "value": "123456789", "format": "digits", "deterministic": true });
    assert_eq!(
        tokenize(&s, "acme", digits.clone()).await.str("token"),
        tokenize(&s, "acme", digits).await.str("token")
    );
    let r1 = tokenize(&s, "acme", json!({ "value": "123-45-6789" }))
        .await
        .str("token");
    let r2 = tokenize(&s, "acme", json!({ "value": "123-45-6789" }))
        .await
        .str("token");
    assert_ne!(r1, r2);
    assert_ne!(r1, a);
    // Still the same after a rotation: the index key does not rotate.
    let _ = s.post("/v1/tenants/acme/keys:rotate", json!({})).await;
    assert_eq!(tokenize(&s, "acme", det).await.str("token"), a);
}

#[tokio::test]
async fn batches_tokenize_with_per_item_errors() {
    let s = Sidecar::start().await;
    let r = s
        .post(
            "/v1/tenants/acme/tokens:batch",
            json!({ "items": [
                { "value": "one" },
                { "value": "12345", "format": "digits" },
                { "value": "not-a-card", "format": "card" },
                { "value": "x", "format": "hex" },
                { "value": "two", "ttl_seconds": 60 }
            ] }),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let res = r.json()["results"].as_array().unwrap().clone();
    assert!(res[0]["token"].is_string());
    assert_eq!(res[1]["error"]["code"], "format_space_too_small");
    assert_eq!(res[2]["error"]["code"], "invalid_value");
    assert_eq!(res[3]["error"]["code"], "invalid_request");
    assert!(res[4]["expires_at"].as_i64().unwrap() > 0);
    let r = tokenize(&s, "acme", json!({ "value": "1234", "format": "digits" })).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "format_space_too_small")
    );
}

#[tokio::test]
async fn reveal_needs_its_own_grant_and_stays_in_its_tenant() {
    let s = Sidecar::start().await;
    let t = s
        .as_token(
            TOKEN_TOKENIZER,
            "POST",
            "/v1/tenants/a-1/tokens",
            json!({ "value": "4111111111111111", "format": "card" }),
        )
        .await;
    assert_eq!(t.status, 200);
    let token = t.str("token");
    let r = reveal(&s, Some(TOKEN_TOKENIZER), "a-1", &[&token], None).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "forbidden"),
        "tokenize does not grant reveal"
    );
    // Masked reveal only with reveal.masked.
    let r = reveal(&s, Some(TOKEN_MASKED), "a-1", &[&token], None).await;
    assert_eq!(r.code(), "forbidden");
    let r = reveal(&s, Some(TOKEN_MASKED), "a-1", &[&token], Some("last4")).await;
    assert_eq!(value_of(&r, 0)["value"], "************1111");
    // Tenant A's principal cannot reach tenant B; B's token string under A is simply unknown.
    let b = tokenize(&s, "b-1", json!({ "value": "secret-b" }))
        .await
        .str("token");
    let r = reveal(&s, Some(TOKEN_A), "b-1", &[&b], None).await;
    assert_eq!(r.code(), "forbidden");
    let r = reveal(&s, Some(TOKEN_A), "a-1", &[&b, &token], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(value_of(&r, 0)["error"]["code"], "token_not_found");
    assert_eq!(value_of(&r, 1)["value"], "4111111111111111");
    // Unknown tenant, garbage tokens: the same answer.
    let r = reveal(
        &s,
        None,
        "nobody",
        &["tok_nope", "", &"x".repeat(600)],
        None,
    )
    .await;
    for i in 0..3 {
        assert_eq!(value_of(&r, i)["error"]["code"], "token_not_found");
    }
}

#[tokio::test]
async fn deleted_and_expired_tokens_are_gone() {
    let s = Sidecar::start_with(Options {
        extra_toml: "[vault]\nsweep_interval_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    let keep = tokenize(&s, "acme", json!({ "value": "keep me" }))
        .await
        .str("token");
    let del = tokenize(&s, "acme", json!({ "value": "delete me" }))
        .await
        .str("token");
    let short = tokenize(
        &s,
        "acme",
        json!({ "value": "expire me", "ttl_seconds": 1 }),
    )
    .await
    .str("token");
    let r = s
        .unix("DELETE", &format!("/v1/tenants/acme/tokens/{del}"), &[], "")
        .await;
    assert_eq!((r.status, r.json()["deleted"].as_bool()), (200, Some(true)));
    let r = s
        .unix("DELETE", &format!("/v1/tenants/acme/tokens/{del}"), &[], "")
        .await;
    assert_eq!(r.code(), "token_not_found");
    let r = s
        .as_token(
            TOKEN_TOKENIZER,
            "DELETE",
            &format!("/v1/tenants/acme/tokens/{keep}"),
            Value::Null,
        )
        .await;
    assert_eq!(r.code(), "forbidden");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = reveal(&s, None, "acme", &[&keep, &del, &short], None).await;
    assert_eq!(value_of(&r, 0)["value"], "keep me");
    assert_eq!(value_of(&r, 1)["error"]["code"], "token_not_found");
    assert_eq!(value_of(&r, 2)["error"]["code"], "token_not_found");
    // The sweep removed the expired row itself.
    let db = rusqlite::Connection::open(s.data_dir().join("store.db")).unwrap();
    let rows: Vec<String> = db
        .prepare("SELECT token FROM tokens")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows, vec![keep]);
}

#[tokio::test]
async fn the_store_holds_no_plaintext_value_and_shred_erases_tokens() {
    let s = Sidecar::start().await;
    let values = [
        "4111111111111111",
        "jane.doe@example.com",
        "ya29.oauth-SECRET-token",
        "078-05-1120",
    ];
    let mut tokens = Vec::new();
    for (v, f) in values.iter().zip(["card", "email", "opaque", "opaque"]) {
        tokens.push(
            tokenize(
                &s,
                "acme",
                json!({ "value": v, "format": f, "deterministic": true }),
            )
            .await
            .str("token"),
        );
    }
    let files: Vec<_> = std::fs::read_dir(s.data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("store.db")
                || p.ends_with("audit.jsonl")
        })
        .collect();
    for p in &files {
        let bytes = std::fs::read(p).unwrap();
        for v in values {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "{v} found in {}",
                p.display()
            );
        }
    }
    let id = s
        .as_token(TOKEN_ADMIN, "POST", "/v1/tenants/acme:shred", Value::Null)
        .await
        .str("approval_id");
    assert_eq!(
        s.as_token(
            TOKEN_ADMIN2,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null
        )
        .await
        .status,
        200
    );
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let r = reveal(&s, None, "acme", &refs, None).await;
    assert!(
        matches!(r.code().as_str(), "tenant_destroyed" | ""),
        "{:?}",
        r.body
    );
    if r.status == 200 {
        for i in 0..refs.len() {
            assert_eq!(value_of(&r, i)["error"]["code"], "token_not_found");
        }
    }
    let db = rusqlite::Connection::open(s.data_dir().join("store.db")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn every_reveal_is_audited_without_values() {
    let mut s = Sidecar::start().await;
    let t = tokenize(&s, "acme", json!({ "value": "audited-secret-value" }))
        .await
        .str("token");
    let _ = reveal(&s, None, "acme", &[&t, "tok_missing"], None).await;
    let _ = s
        .unix(
            "DELETE",
            &format!("/v1/tenants/acme/tokens/{t}"),
            &[("x-request-id", "del-1")],
            "",
        )
        .await;
    s.stop().await;
    let text = std::fs::read_to_string(s.data_dir().join("audit.jsonl")).unwrap();
    assert!(!text.contains("audited-secret-value"));
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rev = lines
        .iter()
        .find(|l| l["operation"] == "reveal")
        .expect("reveal audited");
    assert_eq!(
        (rev["count"].as_u64(), rev["tenant"].as_str()),
        (Some(1), Some("acme"))
    );
    assert!(rev["request_id"].is_string() && rev["principal"] == "admin");
    let del = lines
        .iter()
        .find(|l| l["operation"] == "tokens.delete")
        .expect("delete audited");
    assert_eq!(
        (del["request_id"].as_str(), del["outcome"].as_str()),
        (Some("del-1"), Some("ok"))
    );
}

/// One million random opaque tokens from the production generator, inserted into a real
/// SQLite store: not one collision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_random_opaque_tokens_never_collide() {
    use kms_sidecar::vault::format::{Format, make_token};
    use kms_sidecar::vault::{InsertOutcome, OsBytes, TokenRow, VaultStore};
    let dir = tempfile::tempdir().unwrap();
    let store = kms_sidecar::store::SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let tenant = kms_sidecar::tenant::TenantId::parse("bulk").unwrap();
    let mut taken = 0;
    for _ in 0..100 {
        let rows: Vec<TokenRow> = (0..10_000)
            .map(|_| TokenRow {
                tenant: tenant.clone(),
                token: make_token(Format::Opaque, "v", &mut OsBytes),
                format: "opaque".into(),
                det_index: None,
                sealed: vec![0; 8],
                key_version: 1,
                created_at: 0,
                expires_at: None,
            })
            .collect();
        for o in store.insert_tokens(&rows, 0).await.unwrap() {
            if o != InsertOutcome::Inserted {
                taken += 1;
            }
        }
    }
    assert_eq!(taken, 0);
    let db = rusqlite::Connection::open(dir.path().join("store.db")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(DISTINCT token) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1_000_000);
}

/// Throughput of tokenize and reveal through the HTTP API over the Unix socket, batches of 1000,
/// 4 connections, embedded SQLite. A measurement, not a check:
/// `cargo test --release --test vault -- --ignored --nocapture vault_http_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn vault_http_throughput() {
    use std::sync::Arc;
    use std::time::Instant;
    let s = Arc::new(Sidecar::start().await);
    let _ = tokenize(&s, "bench", json!({ "value": "warm" })).await;
    const CLIENTS: usize = 4;
    const BATCHES: usize = 25;
    const BATCH: usize = 1000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for b in 0..BATCHES {
                let items: Vec<Value> = (0..BATCH)
                    .map(|i| json!({ "value": format!("4111-{c}-{b}-{i}-secret") }))
                    .collect();
                let r = s
                    .post("/v1/tenants/bench/tokens:batch", json!({ "items": items }))
                    .await;
                assert_eq!(r.status, 200);
                for t in r.json()["results"].as_array().unwrap() {
                    tokens.push(t["token"].as_str().unwrap().to_owned());
                }
            }
            tokens
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    let tok_secs = start.elapsed().as_secs_f64();
    let n = (CLIENTS * BATCHES * BATCH) as f64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for tokens in all {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in tokens.chunks(BATCH) {
                let r = s
                    .post(
                        "/v1/tenants/bench/tokens:reveal",
                        json!({ "tokens": chunk }),
                    )
                    .await;
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rev_secs = start.elapsed().as_secs_f64();
    println!(
        "tokenize: {:.0}/s ({n} tokens in {tok_secs:.2} s); reveal: {:.0}/s ({n} in {rev_secs:.2} s)",
        n / tok_secs,
        n / rev_secs
    );
}
