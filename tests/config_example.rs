//! The example configuration in deploy/ is valid and means what its comments say.

use kms_sidecar::config::{Config, RootConfig};

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
