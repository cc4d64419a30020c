use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use async_trait::async_trait;

use super::*;
use crate::keyring::{RewrapPlan, rewrap_roots};
use crate::providers::keyfile::KeyfileRoot;
use crate::store::SqliteStore;

const OK: u8 = 0;
const DOWN: u8 = 1;
const DENIED: u8 = 2;

/// A keyfile root that can be made unreachable or refusing, and counts its unwraps.
struct Switch {
    inner: KeyfileRoot,
    mode: AtomicU8,
    unwraps: AtomicU64,
}

impl Switch {
    fn new(b: u8) -> Arc<Switch> {
        Arc::new(Switch {
            inner: KeyfileRoot::from_key(&[b; 32]).unwrap(),
            mode: AtomicU8::new(OK),
            unwraps: AtomicU64::new(0),
        })
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), ProviderError> {
        let root = self.inner.id().to_string();
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(ProviderError::Unavailable {
                root,
                reason: "switched off".into(),
            }),
            DENIED => Err(ProviderError::AccessDenied { root }),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl RootProvider for Switch {
    fn id(&self) -> &RootId {
        self.inner.id()
    }
    async fn wrap(&self, dek: &DataKey, ctx: &WrapContext<'_>) -> Result<Vec<u8>, ProviderError> {
        self.check()?;
        self.inner.wrap(dek, ctx).await
    }
    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.unwrap(blob, ctx).await
    }
    async fn health(&self) -> Result<(), ProviderError> {
        self.check()
    }
}

/// Customer roots known by id, as the AWS connection would make them.
struct Customers(HashMap<RootId, Arc<Switch>>);

impl RootFactory for Customers {
    fn root(&self, id: &RootId) -> Result<Arc<dyn RootProvider>, ProviderError> {
        self.0
            .get(id)
            .map(|r| Arc::clone(r) as Arc<dyn RootProvider>)
            .ok_or_else(|| ProviderError::Setup(format!("no root {id}")))
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    keyring: Keyring,
}

fn world(roots: &[&Arc<Switch>], customers: &[&Arc<Switch>], options: KeyringOptions) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
    let factory = (!customers.is_empty()).then(|| {
        Arc::new(Customers(
            customers
                .iter()
                .map(|c| (c.id().clone(), Arc::clone(c)))
                .collect(),
        )) as Arc<dyn RootFactory>
    });
    let keyring = Keyring::with_parts(
        store.clone(),
        roots
            .iter()
            .map(|r| Arc::clone(r) as Arc<dyn RootProvider>)
            .collect(),
        factory,
        KeyringOptions {
            auto_create_tenants: true,
            ..options
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    World {
        _dir: dir,
        store,
        keyring,
    }
}

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

async fn seal(kr: &Keyring, t: &TenantId, pt: &[u8]) -> Vec<u8> {
    kr.seal(t, Purpose::Data, b"", SecretBytes::new(pt.to_vec()))
        .await
        .unwrap()
        .0
}

async fn roots_of(store: &SqliteStore, t: &TenantId) -> Vec<Vec<RootId>> {
    store
        .key_versions(t)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.wrappings.into_iter().map(|w| w.root).collect())
        .collect()
}

#[tokio::test]
async fn set_root_moves_every_version_and_new_versions_use_only_the_tenant_root() {
    let (main, escrow, customer) = (Switch::new(1), Switch::new(2), Switch::new(3));
    let w = world(&[&main, &escrow], &[&customer], KeyringOptions::default());
    let t = tenant("byok");
    let ct1 = seal(&w.keyring, &t, b"one").await;
    w.keyring.rotate(&t).await.unwrap();
    let ct2 = seal(&w.keyring, &t, b"two").await;
    assert_eq!(
        roots_of(&w.store, &t).await,
        vec![vec![main.id().clone(), escrow.id().clone()]; 2]
    );

    let moved = w.keyring.set_root(&t, customer.id()).await.unwrap();
    assert_eq!((moved.versions, moved.rewrapped), (2, 2));
    assert_eq!(moved.tenant.root.as_ref(), Some(customer.id()));
    assert_eq!(
        roots_of(&w.store, &t).await,
        vec![vec![customer.id().clone()]; 2]
    );
    let again = w.keyring.set_root(&t, customer.id()).await.unwrap();
    assert_eq!(again.rewrapped, 0, "idempotent");

    // The configured roots no longer open this tenant's keys: only the customer's does.
    main.set(DENIED);
    escrow.set(DENIED);
    w.keyring.invalidate(&t).await;
    for (ct, pt) in [(&ct1, &b"one"[..]), (&ct2, b"two")] {
        let got = w.keyring.open(&t, Purpose::Data, b"", ct).await.unwrap();
        assert_eq!(got.expose(), pt);
    }
    w.keyring.rotate(&t).await.unwrap();
    assert_eq!(
        roots_of(&w.store, &t).await,
        vec![vec![customer.id().clone()]; 3]
    );

    // Revoking the customer's key stops the tenant once the cache is gone.
    customer.set(DENIED);
    w.keyring.invalidate(&t).await;
    let e = w
        .keyring
        .open(&t, Purpose::Data, b"", &ct1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            KeyringError::Provider(ProviderError::AccessDenied { .. })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn set_root_is_refused_before_any_change_when_the_root_is_unusable() {
    let (main, customer) = (Switch::new(1), Switch::new(3));
    let t = tenant("t");
    let w = world(&[&main], &[], KeyringOptions::default());
    seal(&w.keyring, &t, b"x").await;
    let e = w.keyring.set_root(&t, customer.id()).await.unwrap_err();
    assert!(matches!(e, KeyringError::Refused(_)), "{e:?}");

    let w = world(&[&main], &[&customer], KeyringOptions::default());
    seal(&w.keyring, &t, b"x").await;
    customer.set(DENIED);
    let e = w.keyring.set_root(&t, customer.id()).await.unwrap_err();
    assert!(
        matches!(
            e,
            KeyringError::Provider(ProviderError::AccessDenied { .. })
        ),
        "{e:?}"
    );
    let record = w.store.tenant(&t).await.unwrap().unwrap();
    assert_eq!(record.root, None);
    assert_eq!(roots_of(&w.store, &t).await, vec![vec![main.id().clone()]]);
}

#[tokio::test]
async fn set_root_creates_a_missing_tenant_under_the_new_root_only() {
    let (main, customer) = (Switch::new(1), Switch::new(3));
    let w = world(&[&main], &[&customer], KeyringOptions::default());
    let t = tenant("fresh");
    let moved = w.keyring.set_root(&t, customer.id()).await.unwrap();
    assert_eq!(moved.versions, 1);
    assert_eq!(
        roots_of(&w.store, &t).await,
        vec![vec![customer.id().clone()]]
    );
}

#[tokio::test]
async fn fallback_unwraps_are_counted() {
    let (main, escrow) = (Switch::new(1), Switch::new(2));
    let w = world(&[&main, &escrow], &[], KeyringOptions::default());
    let t = tenant("fb");
    let ct = seal(&w.keyring, &t, b"x").await;
    w.keyring.invalidate(&t).await;
    main.set(DOWN);
    w.keyring.open(&t, Purpose::Data, b"", &ct).await.unwrap();
    let text = w.keyring.metrics().encode();
    assert!(
        text.contains(&format!(
            "kms_sidecar_fallback_unwraps_total{{root=\"{}\"}} 1",
            escrow.id()
        )),
        "{text}"
    );
}

#[tokio::test]
async fn stale_keys_bridge_an_unreachable_root_but_never_a_refusing_one() {
    let main = Switch::new(1);
    let options = KeyringOptions {
        cache_ttl: Duration::from_millis(300),
        stale_if_error: Duration::from_secs(60),
        ..KeyringOptions::default()
    };
    let w = world(&[&main], &[], options);
    let t = tenant("stale");
    let ct = seal(&w.keyring, &t, b"x").await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    main.set(DOWN);
    w.keyring.open(&t, Purpose::Data, b"", &ct).await.unwrap();
    main.set(DENIED);
    assert!(w.keyring.open(&t, Purpose::Data, b"", &ct).await.is_err());
    main.set(DOWN);
    let e = w
        .keyring
        .open(&t, Purpose::Data, b"", &ct)
        .await
        .unwrap_err();
    assert!(
        matches!(e, KeyringError::Provider(ProviderError::Unavailable { .. })),
        "the refusal dropped the stale key: {e:?}"
    );

    // Without the option an expired key is never used.
    let w = world(
        &[&main],
        &[],
        KeyringOptions {
            cache_ttl: Duration::from_millis(300),
            ..KeyringOptions::default()
        },
    );
    main.set(OK);
    let ct = seal(&w.keyring, &t, b"x").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    main.set(DOWN);
    assert!(w.keyring.open(&t, Purpose::Data, b"", &ct).await.is_err());
}

#[tokio::test]
async fn root_rewrap_leaves_tenants_with_their_own_root_alone() {
    let (main, next, customer) = (Switch::new(1), Switch::new(2), Switch::new(3));
    let w = world(&[&main], &[&customer], KeyringOptions::default());
    let (plain, byok) = (tenant("plain"), tenant("own"));
    seal(&w.keyring, &plain, b"x").await;
    seal(&w.keyring, &byok, b"y").await;
    w.keyring.set_root(&byok, customer.id()).await.unwrap();
    let plan = RewrapPlan {
        roots: vec![main.clone() as Arc<dyn RootProvider>],
        to: next.clone(),
        drop: Some(main.id().clone()),
    };
    let summary = rewrap_roots(w.store.as_ref(), &plan, |_, _| {})
        .await
        .unwrap();
    assert_eq!((summary.rewrapped, summary.customer_managed), (1, 1));
    assert_eq!(
        roots_of(&w.store, &plain).await,
        vec![vec![next.id().clone()]]
    );
    assert_eq!(
        roots_of(&w.store, &byok).await,
        vec![vec![customer.id().clone()]]
    );
}
