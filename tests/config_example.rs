//! The example configurations in deploy/ are valid and mean what their comments say: the
//! annotated TOML, and the config.toml embedded in the Kubernetes manifest (with the store URL
//! its Secret provides).

use kms_sidecar::config::{Config, RootConfig, StoreEngine};

#[test]
fn the_deploy_example_parses_and_validates() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kms-sidecar.example.toml"
    );
    let env = vec![("KMS_ROOT_PASSPHRASE".to_string(), "example".to_string())];
    let c = Config::load(Some(std::path::Path::new(path)), env).unwrap();
    assert_eq!(c.listen.tcp.as_deref(), Some("127.0.0.1:8787"));
    assert_eq!(c.cache.ttl_seconds, 300);
    let principals = c.principals().unwrap();
    assert_eq!(principals.len(), 2);
    assert!(matches!(
        &c.roots()[0],
        RootConfig::Keyfile {
            passphrase_env: Some(_),
            ..
        }
    ));
    assert!(c.passphrase("KMS_ROOT_PASSPHRASE").is_some());
    let aws = c.aws.as_ref().expect("[aws]");
    assert_eq!(aws.region.as_deref(), Some("us-east-1"));
    assert_eq!((aws.max_attempts, aws.operation_timeout_ms), (3, 5000));
    assert_eq!(c.cache.stale_if_error_seconds, 0);
}

/// The block scalar under `key: |` in a YAML file, de-indented (enough for our own manifest;
/// scripts/check_deploy.py parses it as YAML proper).
fn yaml_block(text: &str, key: &str) -> String {
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let head = lines.next().expect("key present");
    let indent = head.len() - head.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_config_map_parses_and_validates_with_its_secret() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes.yaml"
    ))
    .unwrap();
    let toml = yaml_block(&manifest, "config.toml");
    let url = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("store-url: "))
        .expect("store-url in the Secret")
        .trim_matches('"')
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let env = vec![
        ("KMS_ROOT_PASSPHRASE".to_string(), "example".to_string()),
        ("KMS_SIDECAR_STORE__URL".to_string(), url),
    ];
    let c = Config::load(Some(&path), env).unwrap();
    let StoreEngine::Postgres(pg) = c.store_engine().unwrap() else {
        panic!("the fleet manifest must select PostgreSQL");
    };
    assert!(pg.describe().contains("TLS required"), "{}", pg.describe());
    assert_eq!(
        c.unix_socket().unwrap(),
        std::path::Path::new("/run/kms-sidecar/kms-sidecar.sock")
    );
    assert_eq!(c.principals().unwrap()[0].unix_uids, vec![10001]);
}
