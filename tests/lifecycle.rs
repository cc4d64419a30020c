//! Key lifecycle through the running sidecar: rotation (also under load and across sidecars),
//! retirement, ciphertext rewrap, four-eyes shredding, and the audit trail of it all.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

async fn seal(s: &Sidecar, tenant: &str, pt: &[u8]) -> (String, u64) {
    let r = s
        .post(
            &format!("/v1/tenants/{tenant}/seal"),
            json!({ "plaintext": b64(pt) }),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    (
        r.str("ciphertext"),
        r.json()["key_version"].as_u64().unwrap(),
    )
}

async fn open(s: &Sidecar, tenant: &str, ct: &str) -> Reply {
    s.post(
        &format!("/v1/tenants/{tenant}/open"),
        json!({ "ciphertext": ct }),
    )
    .await
}

async fn rotate(s: &Sidecar, tenant: &str) -> u64 {
    let r = s
        .post(&format!("/v1/tenants/{tenant}/keys:rotate"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["active_version"].as_u64().unwrap()
}

fn audit_lines(s: &Sidecar) -> Vec<Value> {
    let text = std::fs::read_to_string(s.data_dir().join("audit.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn rotation_keeps_old_versions_openable() {
    let s = Sidecar::start().await;
    let (old, v) = seal(&s, "acme", b"before").await;
    assert_eq!(v, 1);
    assert_eq!(rotate(&s, "acme").await, 2);
    let (new, v) = seal(&s, "acme", b"after").await;
    assert_eq!(v, 2, "new seals use the new version at once");
    assert_eq!(
        unb64(&open(&s, "acme", &old).await.str("plaintext")),
        b"before"
    );
    assert_eq!(
        unb64(&open(&s, "acme", &new).await.str("plaintext")),
        b"after"
    );
    let keys = s.unix("GET", "/v1/tenants/acme/keys", &[], "").await.json();
    let states: Vec<_> = keys["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(states, ["decrypt-only", "active"]);
    // Rotating an unknown tenant is not a way to create one.
    let r = s.post("/v1/tenants/ghost/keys:rotate", json!({})).await;
    assert_eq!(r.code(), "tenant_not_found");
}

#[tokio::test]
async fn rotating_100_times_under_load_loses_nothing() {
    let s = Arc::new(Sidecar::start().await);
    let _ = seal(&s, "busy", b"warm").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4u8 {
        let (s, stop) = (s.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut made = Vec::new();
            let mut errors = 0;
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let pt = format!("worker {w} message {i}");
                let r = s
                    .post(
                        "/v1/tenants/busy/seal",
                        json!({ "plaintext": b64(pt.as_bytes()) }),
                    )
                    .await;
                if r.status != 200 {
                    errors += 1;
                    continue;
                }
                let ct = r.str("ciphertext");
                let o = open(&s, "busy", &ct).await;
                if o.status != 200 || unb64(&o.str("plaintext")) != pt.as_bytes() {
                    errors += 1;
                }
                made.push((ct, pt));
                i += 1;
            }
            (made, errors)
        }));
    }
    for n in 0..100 {
        assert_eq!(rotate(&s, "busy").await, n + 2);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        let (made, errors) = w.await.unwrap();
        assert_eq!(errors, 0);
        all.extend(made);
    }
    assert!(
        all.len() > 100,
        "the workers ran during the rotations ({})",
        all.len()
    );
    let mut versions = std::collections::BTreeSet::new();
    for (ct, pt) in &all {
        versions.insert(unb64(ct)[5]);
        let o = open(&s, "busy", ct).await;
        assert_eq!(unb64(&o.str("plaintext")), pt.as_bytes());
    }
    assert!(
        versions.len() > 10,
        "ciphertexts span many versions: {versions:?}"
    );
    let keys = s.unix("GET", "/v1/tenants/busy/keys", &[], "").await.json();
    let versions = keys["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 101);
    assert_eq!(
        versions.iter().filter(|v| v["state"] == "active").count(),
        1
    );
}

#[tokio::test]
async fn retired_versions_refuse_to_open() {
    let s = Sidecar::start().await;
    let (v1, _) = seal(&s, "acme", b"one").await;
    rotate(&s, "acme").await;
    let (v2, _) = seal(&s, "acme", b"two").await;
    let r = s
        .post(
            "/v1/tenants/acme/keys:retire",
            json!({ "min_decrypt_version": 2 }),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["min_decrypt_version"].as_u64()),
        (200, Some(2))
    );
    let r = open(&s, "acme", &v1).await;
    assert_eq!((r.status, r.code().as_str()), (409, "key_version_retired"));
    assert_eq!(open(&s, "acme", &v2).await.status, 200);
    let r = s
        .post(
            "/v1/tenants/acme/keys:retire",
            json!({ "min_decrypt_version": 3 }),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "conflict"));
    // Lowering it again re-enables the old version (operators can undo a mistaken retire).
    let r = s
        .post(
            "/v1/tenants/acme/keys:retire",
            json!({ "min_decrypt_version": 1 }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(open(&s, "acme", &v1).await.status, 200);
}

#[tokio::test]
async fn rewrap_moves_ciphertexts_to_the_active_version_without_showing_plaintext() {
    let s = Sidecar::start().await;
    let (ct, _) = seal(&s, "acme", b"payload").await;
    rotate(&s, "acme").await;
    rotate(&s, "acme").await;
    let r = s
        .as_token(
            TOKEN_REWRAP_ONLY,
            "POST",
            "/v1/tenants/acme/rewrap",
            json!({ "ciphertext": ct }),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["key_version"], 3);
    assert!(r.json().get("plaintext").is_none());
    let moved = r.str("ciphertext");
    assert_eq!(unb64(&moved)[5], 3);
    assert_eq!(
        unb64(&open(&s, "acme", &moved).await.str("plaintext")),
        b"payload"
    );
    let r = s
        .as_token(
            TOKEN_REWRAP_ONLY,
            "POST",
            "/v1/tenants/acme/open",
            json!({ "ciphertext": moved }),
        )
        .await;
    assert_eq!(r.code(), "forbidden", "rewrap does not grant open");
    let mut bad = unb64(&ct);
    bad[90] ^= 1;
    let r = s
        .post(
            "/v1/tenants/acme/rewrap:batch",
            json!({ "items": [ { "ciphertext": ct }, { "ciphertext": b64(&bad) } ] }),
        )
        .await;
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results[0]["key_version"], 3);
    assert_eq!(results[1]["error"]["code"], "decrypt_failed");
}

#[tokio::test]
async fn shred_needs_a_second_admin_and_erases_the_tenant() {
    let s = Sidecar::start().await;
    let (ct, _) = seal(&s, "doomed", b"customer data").await;
    let _ = s.post("/v1/tenants/doomed/datakey", json!({})).await;
    let _ = seal(&s, "kept", b"other customer").await;
    let snapshot = s.snapshot().await;
    let blob_hex = snapshot
        .lines()
        .skip_while(|l| !l.contains("TenantId(doomed)"))
        .nth(1)
        .and_then(|l| l.split('=').nth(1))
        .unwrap()
        .to_owned();
    let blob = hex::decode(&blob_hex).unwrap();

    let r = s
        .as_token(TOKEN_ADMIN, "POST", "/v1/tenants/doomed:shred", json!({}))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.str("approval_id");
    assert_eq!(r.json()["requested_by"], "admin");
    // Nothing happens before the approval.
    assert_eq!(open(&s, "doomed", &ct).await.status, 200);
    let r = s
        .as_token(
            TOKEN_ADMIN,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "approval_same_principal")
    );
    let r = s
        .as_token(
            TOKEN_A,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!(
        r.code(),
        "forbidden",
        "the approver needs admin.shred on the tenant"
    );
    let pending = s
        .as_token(TOKEN_ADMIN2, "GET", "/v1/approvals", Value::Null)
        .await
        .json();
    assert_eq!(pending["approvals"][0]["approval_id"], id.as_str());

    let r = s
        .as_token(
            TOKEN_ADMIN2,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (r.json()["approved_by"].as_str(), r.json()["state"].as_str()),
        (Some("admin2"), Some("executed"))
    );
    let r = s
        .as_token(
            TOKEN_ADMIN2,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!(r.code(), "approval_not_pending");

    let r = open(&s, "doomed", &ct).await;
    assert_eq!((r.status, r.code().as_str()), (410, "tenant_destroyed"));
    let r = s
        .post("/v1/tenants/doomed/seal", json!({ "plaintext": "AA==" }))
        .await;
    assert_eq!(
        r.code(),
        "tenant_destroyed",
        "auto-create never resurrects a shredded tenant"
    );
    assert_eq!(
        open(&s, "kept", &seal(&s, "kept", b"x").await.0)
            .await
            .status,
        200
    );

    // The wrapped key bytes are gone from every store file.
    for f in std::fs::read_dir(s.data_dir()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("store.db")
        {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(blob.len()).any(|w| w == &blob[..]),
                "wrapped key still in {}",
                p.display()
            );
        }
    }
    // The audit log tells the story with both principals.
    let lines = audit_lines(&s);
    let find = |op: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| l["operation"] == op && l["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {op}/{outcome} in {lines:#?}"))
            .clone()
    };
    let req = find("admin.shred.request", "ok");
    assert_eq!(
        (req["principal"].as_str(), req["tenant"].as_str()),
        (Some("admin"), Some("doomed"))
    );
    let refused = find("admin.shred.approve", "approval_same_principal");
    assert_eq!(refused["principal"], "admin");
    let exec = find("admin.shred.execute", "ok");
    assert_eq!(
        (
            exec["principal"].as_str(),
            exec["requested_by"].as_str(),
            exec["approved_by"].as_str(),
            exec["approval_id"].as_str()
        ),
        (
            Some("admin2"),
            Some("admin"),
            Some("admin2"),
            Some(id.as_str())
        )
    );
    kms_sidecar::audit::verify(&[s.data_dir().join("audit.jsonl")]).unwrap();
    // Records never carry values or keys.
    let text = std::fs::read_to_string(s.data_dir().join("audit.jsonl")).unwrap();
    assert!(!text.contains(&b64(b"customer data")) && !text.contains("customer data"));
}

#[tokio::test]
async fn one_version_can_be_shredded_but_not_the_active_one() {
    let s = Sidecar::start().await;
    let (v1, _) = seal(&s, "acme", b"old").await;
    let r = s
        .as_token(
            TOKEN_ADMIN,
            "POST",
            "/v1/tenants/acme:shred",
            json!({ "version": 1 }),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (409, "conflict"));
    rotate(&s, "acme").await;
    let (v2, _) = seal(&s, "acme", b"new").await;
    let id = s
        .as_token(
            TOKEN_ADMIN,
            "POST",
            "/v1/tenants/acme:shred",
            json!({ "version": 1 }),
        )
        .await
        .str("approval_id");
    let r = s
        .as_token(
            TOKEN_ADMIN2,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(open(&s, "acme", &v1).await.code(), "key_version_destroyed");
    assert_eq!(open(&s, "acme", &v2).await.status, 200);
}

#[tokio::test]
async fn approvals_expire() {
    let s = Sidecar::start_with(Options {
        extra_toml: "[shred]\napproval_window_seconds = 1\n".into(),
        ..Options::default()
    })
    .await;
    let _ = seal(&s, "acme", b"x").await;
    let id = s
        .as_token(TOKEN_ADMIN, "POST", "/v1/tenants/acme:shred", Value::Null)
        .await
        .str("approval_id");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = s
        .as_token(
            TOKEN_ADMIN2,
            "POST",
            &format!("/v1/approvals/{id}:approve"),
            Value::Null,
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (410, "approval_expired"));
}

#[tokio::test]
async fn a_rotation_on_one_sidecar_reaches_another_within_a_second() {
    let a = Sidecar::start().await;
    let b = Sidecar::start_with(Options {
        share: Some(a.data_dir()),
        ..Options::default()
    })
    .await;
    let _ = seal(&a, "shared", b"x").await;
    assert_eq!(
        seal(&b, "shared", b"y").await.1,
        1,
        "b has version 1 cached"
    );
    rotate(&a, "shared").await;
    let start = Instant::now();
    loop {
        if seal(&b, "shared", b"z").await.1 == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "b still seals under version 1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "rotation visible on the other sidecar after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn keys_rotate_automatically_by_period() {
    let s = Sidecar::start_with(Options {
        extra_toml: "[rotation]\nperiod_seconds = 1\ncheck_interval_seconds = 1\n[[rotation.tenants]]\npattern = \"frozen-*\"\nperiod_seconds = 0\n".into(),
        ..Options::default()
    })
    .await;
    let _ = seal(&s, "auto", b"x").await;
    let _ = seal(&s, "frozen-1", b"x").await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(seal(&s, "auto", b"y").await.1 >= 2);
    assert_eq!(seal(&s, "frozen-1", b"y").await.1, 1);
}

#[tokio::test]
async fn data_plane_is_audited_in_aggregate_and_failed_auth_individually() {
    let mut s = Sidecar::start().await;
    for _ in 0..5 {
        let _ = seal(&s, "acme", b"x").await;
    }
    let _ = s
        .tcp(
            Some("wrong-token-0123456789"),
            "POST",
            "/v1/tenants/acme/seal",
            "{}",
        )
        .await;
    s.stop().await;
    let lines = audit_lines(&s);
    let seals: u64 = lines
        .iter()
        .filter(|l| l["operation"] == "seal" && l["outcome"] == "ok")
        .map(|l| l["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(seals, 5);
    let denied = lines
        .iter()
        .find(|l| l["outcome"] == "unauthenticated")
        .expect("failed auth recorded");
    assert!(
        denied["peer"]
            .as_str()
            .unwrap()
            .starts_with("tcp:127.0.0.1:")
    );
    assert!(denied["request_id"].is_string());
}

/// Data-plane requests in the default aggregate mode: one record per (principal, tenant,
/// operation, outcome) and second, with the exact count, and the chain still verifies.
#[tokio::test]
async fn data_plane_requests_are_aggregated_with_exact_counts() {
    let s = Sidecar::start().await;
    let mut sealed = Vec::new();
    for i in 0..7u8 {
        sealed.push(seal(&s, "agg", &[i; 10]).await.0);
    }
    for ct in &sealed[..3] {
        open(&s, "agg", ct).await;
    }
    let mut bad = unb64(&sealed[0]);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let r = s
        .post("/v1/tenants/agg/open", json!({ "ciphertext": b64(&bad) }))
        .await;
    assert_eq!(r.code(), "decrypt_failed");
    // Aggregates are written every second.
    let count = |lines: &[Value], op: &str, outcome: &str| -> u64 {
        lines
            .iter()
            .filter(|l| l["operation"] == op && l["outcome"] == outcome && l["tenant"] == "agg")
            .map(|l| l["count"].as_u64().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let lines = loop {
        let lines = audit_lines(&s);
        if count(&lines, "seal", "ok") == 7 && count(&lines, "open", "decrypt_failed") == 1 {
            break lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "aggregates not written in 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(count(&lines, "open", "ok"), 3);
    let agg: Vec<&Value> = lines
        .iter()
        .filter(|l| l["tenant"] == "agg" && l["operation"] == "seal")
        .collect();
    assert!(agg.iter().all(|l| l["principal"].is_string()), "{agg:?}");
    kms_sidecar::audit::verify(&[s.data_dir().join("audit.jsonl")]).unwrap();
}
