//! moto's KMS server for the AWS tests: where it runs (started by scripts/test.sh, which exports
//! `TEST_MOTO_KMS_URL`), a KMS client with fake static credentials, keys, and the `[aws]`
//! configuration that points a sidecar at it. Under `CI=true` a missing moto fails the test.

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};

/// moto's endpoint, or `None` (the test then returns early) outside CI.
pub fn moto_url() -> Option<String> {
    match std::env::var("TEST_MOTO_KMS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "TEST_MOTO_KMS_URL is not set: under CI=true the moto KMS tests must run \
                 (scripts/test.sh starts moto and sets it)"
            );
            eprintln!("TEST_MOTO_KMS_URL not set: skipping (run ./scripts/test.sh)");
            None
        }
    }
}

/// A KMS client for moto, with fake static credentials.
pub fn kms_client(endpoint: &str) -> Client {
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .build();
    Client::from_conf(config)
}

/// A new symmetric key; returns its ARN. With `alias`, also creates `alias/<alias>`.
pub async fn create_key(client: &Client, alias: Option<&str>) -> String {
    let key = client
        .create_key()
        .description("kms-sidecar test key")
        .send()
        .await
        .expect("moto CreateKey")
        .key_metadata
        .expect("key metadata");
    if let Some(a) = alias {
        client
            .create_alias()
            .alias_name(format!("alias/{a}"))
            .target_key_id(&key.key_id)
            .send()
            .await
            .expect("moto CreateAlias");
    }
    key.arn.expect("key ARN")
}

/// An `[aws]` section pointing at `endpoint` with fake credentials; `extra` adds keys to it
/// (timeouts, retries).
pub fn aws_toml(endpoint: &str, extra: &str) -> String {
    format!(
        "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n{extra}\n"
    )
}

/// Tight bounds for the fault tests: 500 ms connect, 1 s per attempt, 3 attempts, 4 s a call.
pub const FAST_FAIL: &str = "connect_timeout_ms = 500\nattempt_timeout_ms = 1000\noperation_timeout_ms = 4000\nmax_attempts = 3\ninitial_backoff_ms = 50\nmax_backoff_ms = 200\n";

/// A `[[roots]]` entry for an AWS KMS key.
pub fn aws_root(key: &str) -> String {
    format!("[[roots]]\nkind = \"aws-kms\"\nkey_id = \"{key}\"\n")
}

/// A `[[roots]]` entry for the harness's keyfile in the data dir.
pub const KEYFILE_ROOT: &str = "[[roots]]\nkind = \"keyfile\"\npath = \"{data}/root.key\"\n";

/// A short random suffix for aliases and tenant names.
pub fn unique(prefix: &str) -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    format!("{prefix}-{}", hex::encode(b))
}
