//! Published envelope test vectors (tests/vectors/envelope_v1.json): the committed file must be
//! exactly what this code generates, every valid vector must open and re-seal byte for byte, and
//! every invalid one must fail. `KMS_SIDECAR_WRITE_VECTORS=1 cargo test --test vectors`
//! rewrites the file (only ever needed if the format changes, which it must not for v1).

use kms_sidecar::crypto::DataKey;
use kms_sidecar::crypto::envelope::{Envelope, Purpose, SealContext, seal_with_salt};
use kms_sidecar::tenant::TenantId;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/envelope_v1.json"
);

fn det(label: &str) -> [u8; 32] {
    Sha256::digest(format!("kms-sidecar test vector {label}").as_bytes()).into()
}

struct Spec {
    name: &'static str,
    tenant: String,
    key_version: u32,
    purpose: Purpose,
    aad: Vec<u8>,
    plaintext: Vec<u8>,
}

fn specs() -> Vec<Spec> {
    let s = |name, tenant: &str, key_version, purpose, aad: &[u8], plaintext: &[u8]| Spec {
        name,
        tenant: tenant.into(),
        key_version,
        purpose,
        aad: aad.to_vec(),
        plaintext: plaintext.to_vec(),
    };
    vec![
        s("empty plaintext", "acme", 1, Purpose::Data, b"", b""),
        s(
            "short text with aad",
            "acme",
            1,
            Purpose::Data,
            b"order-7",
            b"4111 1111 1111 1111",
        ),
        s("one block", "t", 2, Purpose::Data, b"", &[0x41; 16]),
        s(
            "1000 bytes",
            "tenant.eu-1_a",
            7,
            Purpose::Data,
            &[0, 1, 2, 255],
            &(0..1000).map(|i| (i * 7 % 256) as u8).collect::<Vec<_>>(),
        ),
        s(
            "longest tenant id",
            &"T".repeat(128),
            3,
            Purpose::Data,
            b"ctx",
            b"hello",
        ),
        s(
            "max key version",
            "acme",
            u32::MAX,
            Purpose::Data,
            b"",
            b"x",
        ),
        s(
            "data key purpose",
            "acme",
            1,
            Purpose::DataKey,
            b"file-9",
            &det("datakey"),
        ),
        s(
            "token value purpose",
            "acme",
            1,
            Purpose::TokenValue,
            b"",
            b"jane@example.com",
        ),
    ]
}

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

fn generate() -> Value {
    let mut vectors = Vec::new();
    for (i, spec) in specs().into_iter().enumerate() {
        let key = det(&format!("key {i}"));
        let salt = det(&format!("salt {i}"));
        let tenant = TenantId::parse(&spec.tenant).unwrap();
        let ctx = SealContext {
            tenant: &tenant,
            purpose: spec.purpose,
            aad: &spec.aad,
        };
        let ct = seal_with_salt(
            &DataKey::from_slice(&key).unwrap(),
            spec.key_version,
            &ctx,
            &spec.plaintext,
            &salt,
        )
        .unwrap();
        let base = json!({
            "name": spec.name,
            "key": hexs(&key),
            "salt": hexs(&salt),
            "tenant": spec.tenant,
            "key_version": spec.key_version,
            "purpose": spec.purpose as u8,
            "aad": hexs(&spec.aad),
            "plaintext": hexs(&spec.plaintext),
            "ciphertext": hexs(&ct),
            "result": "valid",
        });
        vectors.push(base.clone());
        if i != 1 {
            continue;
        }
        // Invalid variants of one valid vector, each changing one thing.
        let mut invalid = |comment: &str,
                           ct: Vec<u8>,
                           tenant: Option<&str>,
                           aad: Option<&[u8]>,
                           purpose: Option<u8>| {
            let mut v = base.clone();
            v["name"] = json!(format!("invalid: {comment}"));
            v["comment"] = json!(comment);
            v["ciphertext"] = json!(hexs(&ct));
            v["plaintext"] = json!("");
            v["result"] = json!("invalid");
            if let Some(t) = tenant {
                v["tenant"] = json!(t);
            }
            if let Some(a) = aad {
                v["aad"] = json!(hexs(a));
            }
            if let Some(p) = purpose {
                v["purpose"] = json!(p);
            }
            vectors.push(v);
        };
        let flip = |at: usize| {
            let mut c = ct.clone();
            c[at] ^= 0x01;
            c
        };
        let n = ct.len();
        invalid("tag bit flipped", flip(n - 1), None, None, None);
        invalid("body bit flipped", flip(70), None, None, None);
        invalid("commitment bit flipped", flip(40), None, None, None);
        invalid("salt bit flipped", flip(6), None, None, None);
        invalid(
            "version byte 2",
            {
                let mut c = ct.clone();
                c[0] = 2;
                c
            },
            None,
            None,
            None,
        );
        invalid(
            "suite byte 2",
            {
                let mut c = ct.clone();
                c[1] = 2;
                c
            },
            None,
            None,
            None,
        );
        invalid(
            "key version 0",
            {
                let mut c = ct.clone();
                c[2..6].copy_from_slice(&[0; 4]);
                c
            },
            None,
            None,
            None,
        );
        invalid(
            "truncated by one byte",
            ct[..n - 1].to_vec(),
            None,
            None,
            None,
        );
        invalid(
            "extended by one byte",
            {
                let mut c = ct.clone();
                c.push(0);
                c
            },
            None,
            None,
            None,
        );
        invalid(
            "shorter than the header",
            ct[..85].to_vec(),
            None,
            None,
            None,
        );
        invalid("another tenant", ct.clone(), Some("acme2"), None, None);
        invalid("another aad", ct.clone(), None, Some(b"order-8"), None);
        invalid("another purpose", ct.clone(), None, None, Some(2));
    }
    json!({ "format": "kms-sidecar envelope v1", "vectors": vectors })
}

fn open(v: &Value) -> Option<Vec<u8>> {
    let h = |f: &str| hex::decode(v[f].as_str().unwrap()).unwrap();
    let tenant = TenantId::parse(v["tenant"].as_str().unwrap()).ok()?;
    let purpose = match v["purpose"].as_u64().unwrap() {
        1 => Purpose::Data,
        2 => Purpose::DataKey,
        3 => Purpose::TokenValue,
        _ => return None,
    };
    let ct = h("ciphertext");
    let env = Envelope::parse(&ct).ok()?;
    if u64::from(env.key_version()) != v["key_version"].as_u64().unwrap() {
        return None;
    }
    let aad = h("aad");
    let ctx = SealContext {
        tenant: &tenant,
        purpose,
        aad: &aad,
    };
    env.open(&DataKey::from_slice(&h("key")).unwrap(), &ctx)
        .ok()
        .map(|p| p.expose().to_vec())
}

#[test]
fn committed_vectors_are_what_the_code_generates() {
    let generated = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
    if std::env::var_os("KMS_SIDECAR_WRITE_VECTORS").is_some() {
        std::fs::write(PATH, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(PATH).expect("tests/vectors/envelope_v1.json");
    assert_eq!(
        committed, generated,
        "the v1 format changed: vectors no longer match"
    );
}

#[test]
fn committed_vectors_open_or_fail_as_labelled() {
    let file: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let vectors = file["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 20);
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        match v["result"].as_str().unwrap() {
            "valid" => {
                let pt = open(v).unwrap_or_else(|| panic!("{name} must open"));
                assert_eq!(hex::encode(pt), v["plaintext"].as_str().unwrap(), "{name}");
            }
            "invalid" => assert!(open(v).is_none(), "{name} must fail"),
            other => panic!("{name}: unknown result {other}"),
        }
    }
}
