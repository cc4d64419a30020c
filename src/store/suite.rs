//! The store behaviour suite: every engine runs these same checks, written against the
//! `KeyringStore` and `VaultStore` ports only. `store_suite!` instantiates them as tests for one
//! engine, given a function that opens two handles (separate connections or pools) on one
//! fresh store. Test-only.

use std::sync::Arc;
use std::time::Duration;

use crate::keyring::{
    Approval, ApprovalState, KeyEventKind, KeyState, KeyVersionRecord, RotateOutcome, ShredTarget,
    StoreChange, StoreError, Wrapping,
};
use crate::providers::RootId;
use crate::store::Store;
use crate::tenant::TenantId;
use crate::vault::{InsertOutcome, TokenRow};

/// Two handles on one fresh store, and whatever keeps it alive (a temp dir, a database).
pub(crate) type Fresh = (
    Box<dyn std::any::Any + Send>,
    Arc<dyn Store>,
    Arc<dyn Store>,
);

pub(crate) fn version(v: u32, roots: &[(&str, u8)]) -> KeyVersionRecord {
    KeyVersionRecord {
        version: v,
        state: KeyState::Active,
        created_at: 1_700_000_000,
        wrappings: roots
            .iter()
            .map(|(r, b)| Wrapping {
                root: RootId::new(*r),
                blob: vec![*b; 61],
            })
            .collect(),
    }
}

pub(crate) fn t(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

/// Defines one `#[tokio::test]` per suite case, each on a store from `$fresh().await`.
macro_rules! store_suite {
    ($fresh:path) => {
        $crate::store::suite::store_suite!(@cases $fresh;
            create_then_read, create_is_idempotent, lists_tenants_in_order,
            concurrent_creators_on_two_handles_end_with_one_tenant,
            concurrent_rotations_on_two_handles_each_add_one_version,
            rotation_is_conditional, retire_is_bounded_by_the_active_version,
            shredding_a_tenant_erases_its_wraps_and_tokens,
            shredding_one_version_spares_the_others, put_wrapping_is_idempotent_and_drops,
            the_change_feed_lists_mutations_in_order, approvals_need_another_principal,
            tokens_insert_look_up_expire_and_delete,
            deterministic_tokens_stay_unique_across_handles,
            a_change_through_one_handle_reaches_the_others_subscription,
            a_tenant_root_binding_is_stored_and_announced);
    };
    (@cases $fresh:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if let Some((_keep, a, b)) = $fresh().await {
                    crate::store::suite::$case(a, b).await;
                }
            }
        )*
    };
}
pub(crate) use store_suite;

pub(crate) async fn create_then_read(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    assert_eq!(store.tenant(&t("acme")).await.unwrap(), None);
    let rec = store
        .create_tenant(
            &t("acme"),
            42,
            &version(1, &[("keyfile:aa", 1), ("keyfile:bb", 2)]),
        )
        .await
        .unwrap();
    assert_eq!(rec.tenant, t("acme"));
    assert_eq!(rec.active_version, 1);
    assert_eq!(rec.created_at, 42);
    assert_eq!(rec.min_decrypt_version, 1);
    assert_eq!(rec.destroyed_at, None);
    let v = store.key_version(&t("acme"), 1).await.unwrap().unwrap();
    assert_eq!(v, version(1, &[("keyfile:aa", 1), ("keyfile:bb", 2)]));
    assert_eq!(store.key_version(&t("acme"), 2).await.unwrap(), None);
    assert_eq!(store.key_versions(&t("acme")).await.unwrap(), vec![v]);
    assert_eq!(store.key_versions(&t("other")).await.unwrap(), vec![]);
}

pub(crate) async fn create_is_idempotent(store: Arc<dyn Store>, other: Arc<dyn Store>) {
    let a = store
        .create_tenant(&t("dup"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    let b = other
        .create_tenant(&t("dup"), 2, &version(1, &[("keyfile:aa", 9)]))
        .await
        .unwrap();
    assert_eq!(a, b, "the second creator gets the first one's tenant");
    let stored = other.key_version(&t("dup"), 1).await.unwrap().unwrap();
    assert_eq!(
        stored.wrappings[0].blob,
        vec![1; 61],
        "the first wrap is kept"
    );
}

pub(crate) async fn lists_tenants_in_order(store: Arc<dyn Store>, _: Arc<dyn Store>) {
    for name in ["zeta", "alpha", "Mid", "mid"] {
        store
            .create_tenant(&t(name), 1, &version(1, &[("keyfile:aa", 1)]))
            .await
            .unwrap();
    }
    let names: Vec<String> = store
        .tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.tenant.to_string())
        .collect();
    assert_eq!(names, ["Mid", "alpha", "mid", "zeta"], "byte order");
    store.health().await.unwrap();
}

pub(crate) async fn concurrent_creators_on_two_handles_end_with_one_tenant(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.create_tenant(&t("race"), i64::from(i), &version(1, &[("keyfile:aa", i)]))
                .await
                .unwrap()
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
    let versions = b.key_versions(&t("race")).await.unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].wrappings.len(), 1);
}

pub(crate) async fn concurrent_rotations_on_two_handles_each_add_one_version(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    a.create_tenant(&t("spin"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    const ROTATIONS_EACH: u32 = 6;
    let mut tasks = Vec::new();
    for i in 0..4u8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut conflicts = 0;
            while done < ROTATIONS_EACH {
                let current = s.tenant(&t("spin")).await.unwrap().unwrap();
                let next = current.active_version + 1;
                match s
                    .rotate(
                        &t("spin"),
                        current.active_version,
                        &version(next, &[("keyfile:aa", i)]),
                    )
                    .await
                {
                    Ok(RotateOutcome::Rotated(r)) => {
                        assert_eq!(r.active_version, next);
                        done += 1;
                    }
                    Ok(RotateOutcome::Conflict(_)) => conflicts += 1,
                    // Two inserts of the same next version: the loser's transaction fails on
                    // the primary key only if the row lock did not serialise them.
                    Err(e) => panic!("rotation failed: {e}"),
                }
            }
            conflicts
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = 4 * ROTATIONS_EACH;
    let versions = a.key_versions(&t("spin")).await.unwrap();
    assert_eq!(versions.len() as u32, 1 + total, "one version per rotation");
    let active: Vec<u32> = versions
        .iter()
        .filter(|v| v.state == KeyState::Active)
        .map(|v| v.version)
        .collect();
    assert_eq!(active, vec![1 + total], "exactly one active version");
    assert_eq!(
        b.tenant(&t("spin")).await.unwrap().unwrap().active_version,
        1 + total
    );
}

pub(crate) async fn rotation_is_conditional(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    s.create_tenant(&t("cond"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    let stale = s
        .rotate(&t("cond"), 2, &version(3, &[("keyfile:aa", 3)]))
        .await
        .unwrap();
    assert!(matches!(stale, RotateOutcome::Conflict(r) if r.active_version == 1));
    let skip = s
        .rotate(&t("cond"), 1, &version(5, &[("keyfile:aa", 5)]))
        .await
        .unwrap();
    assert!(matches!(skip, RotateOutcome::Conflict(_)));
    let ok = s
        .rotate(&t("cond"), 1, &version(2, &[("keyfile:aa", 2)]))
        .await
        .unwrap();
    assert!(matches!(ok, RotateOutcome::Rotated(r) if r.active_version == 2));
    let states: Vec<KeyState> = s
        .key_versions(&t("cond"))
        .await
        .unwrap()
        .iter()
        .map(|v| v.state)
        .collect();
    assert_eq!(states, [KeyState::DecryptOnly, KeyState::Active]);
    assert!(matches!(
        s.rotate(&t("ghost"), 1, &version(2, &[])).await,
        Err(StoreError::Refused(_))
    ));
}

pub(crate) async fn retire_is_bounded_by_the_active_version(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    s.create_tenant(&t("ret"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    s.rotate(&t("ret"), 1, &version(2, &[("keyfile:aa", 2)]))
        .await
        .unwrap();
    assert_eq!(
        s.set_min_decrypt_version(&t("ret"), 2)
            .await
            .unwrap()
            .min_decrypt_version,
        2
    );
    assert!(matches!(
        s.set_min_decrypt_version(&t("ret"), 3).await,
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        s.set_min_decrypt_version(&t("ret"), 0).await,
        Err(StoreError::Refused(_))
    ));
    assert_eq!(
        s.set_min_decrypt_version(&t("ret"), 1)
            .await
            .unwrap()
            .min_decrypt_version,
        1,
        "retiring is reversible"
    );
}

fn token_row(tenant: &str, token: &str, det: Option<u8>, expires_at: Option<i64>) -> TokenRow {
    TokenRow {
        tenant: t(tenant),
        token: token.into(),
        format: "opaque".into(),
        det_index: det.map(|d| vec![d; 32]),
        sealed: vec![7; 40],
        key_version: 1,
        created_at: 100,
        expires_at,
    }
}

pub(crate) async fn shredding_a_tenant_erases_its_wraps_and_tokens(
    s: Arc<dyn Store>,
    other: Arc<dyn Store>,
) {
    s.create_tenant(&t("gone"), 1, &version(1, &[("keyfile:aa", 0xAB)]))
        .await
        .unwrap();
    s.rotate(&t("gone"), 1, &version(2, &[("keyfile:aa", 0xCD)]))
        .await
        .unwrap();
    s.create_tenant(&t("kept"), 1, &version(1, &[("keyfile:aa", 0xEF)]))
        .await
        .unwrap();
    s.insert_tokens(
        &[
            token_row("gone", "tok_1", None, None),
            token_row("kept", "tok_2", None, None),
        ],
        100,
    )
    .await
    .unwrap();
    other
        .shred(&t("gone"), ShredTarget::Tenant, 555)
        .await
        .unwrap();
    let rec = s.tenant(&t("gone")).await.unwrap().unwrap();
    assert_eq!(rec.destroyed_at, Some(555));
    for v in s.key_versions(&t("gone")).await.unwrap() {
        assert_eq!(v.state, KeyState::Destroyed);
        assert!(v.wrappings.is_empty(), "no wrap of version {}", v.version);
    }
    let found = s
        .lookup_tokens(&t("gone"), &["tok_1".into()], 100)
        .await
        .unwrap();
    assert_eq!(found, vec![None]);
    let kept = s
        .lookup_tokens(&t("kept"), &["tok_2".into()], 100)
        .await
        .unwrap();
    assert!(kept[0].is_some());
    assert_eq!(
        s.key_version(&t("kept"), 1)
            .await
            .unwrap()
            .unwrap()
            .wrappings[0]
            .blob,
        vec![0xEF; 61]
    );
    assert!(matches!(
        s.rotate(&t("gone"), 2, &version(3, &[])).await,
        Err(StoreError::Refused(_))
    ));
    // Shredding twice keeps the first time.
    s.shred(&t("gone"), ShredTarget::Tenant, 999).await.unwrap();
    assert_eq!(
        s.tenant(&t("gone")).await.unwrap().unwrap().destroyed_at,
        Some(555)
    );
}

pub(crate) async fn shredding_one_version_spares_the_others(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    s.create_tenant(&t("part"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    s.rotate(&t("part"), 1, &version(2, &[("keyfile:aa", 2)]))
        .await
        .unwrap();
    assert!(matches!(
        s.shred(&t("part"), ShredTarget::Version(2), 9).await,
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        s.shred(&t("part"), ShredTarget::Version(7), 9).await,
        Err(StoreError::Refused(_))
    ));
    s.shred(&t("part"), ShredTarget::Version(1), 9)
        .await
        .unwrap();
    let v1 = s.key_version(&t("part"), 1).await.unwrap().unwrap();
    assert_eq!(v1.state, KeyState::Destroyed);
    assert!(v1.wrappings.is_empty());
    let v2 = s.key_version(&t("part"), 2).await.unwrap().unwrap();
    assert_eq!(v2.state, KeyState::Active);
    assert_eq!(v2.wrappings.len(), 1);
    assert_eq!(
        s.tenant(&t("part")).await.unwrap().unwrap().destroyed_at,
        None
    );
}

pub(crate) async fn put_wrapping_is_idempotent_and_drops(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    s.create_tenant(
        &t("wrap"),
        1,
        &version(1, &[("keyfile:old", 1), ("keyfile:escrow", 2)]),
    )
    .await
    .unwrap();
    let new = Wrapping {
        root: RootId::new("keyfile:new"),
        blob: vec![3; 61],
    };
    let old = RootId::new("keyfile:old");
    assert!(
        s.put_wrapping(&t("wrap"), 1, &new, Some(&old))
            .await
            .unwrap()
    );
    assert!(
        !s.put_wrapping(&t("wrap"), 1, &new, Some(&old))
            .await
            .unwrap(),
        "a second run changes nothing"
    );
    let roots: Vec<String> = s
        .key_version(&t("wrap"), 1)
        .await
        .unwrap()
        .unwrap()
        .wrappings
        .iter()
        .map(|w| w.root.to_string())
        .collect();
    assert_eq!(
        roots,
        ["keyfile:escrow", "keyfile:new"],
        "in the order added"
    );
    // Dropping the root being added is ignored, not a way to lose the only wrap.
    assert!(
        !s.put_wrapping(&t("wrap"), 1, &new, Some(&new.root))
            .await
            .unwrap()
    );
    assert!(matches!(
        s.put_wrapping(&t("wrap"), 9, &new, None).await,
        Err(StoreError::Refused(_))
    ));
    s.rotate(&t("wrap"), 1, &version(2, &[("keyfile:new", 4)]))
        .await
        .unwrap();
    s.shred(&t("wrap"), ShredTarget::Version(1), 5)
        .await
        .unwrap();
    assert!(
        !s.put_wrapping(&t("wrap"), 1, &new, None).await.unwrap(),
        "a destroyed version is never given key material again"
    );
    assert!(
        s.key_version(&t("wrap"), 1)
            .await
            .unwrap()
            .unwrap()
            .wrappings
            .is_empty()
    );
}

pub(crate) async fn the_change_feed_lists_mutations_in_order(
    s: Arc<dyn Store>,
    other: Arc<dyn Store>,
) {
    assert_eq!(s.last_event().await.unwrap(), 0);
    s.create_tenant(&t("feed"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    let start = s.last_event().await.unwrap();
    other
        .rotate(&t("feed"), 1, &version(2, &[("keyfile:aa", 2)]))
        .await
        .unwrap();
    s.set_min_decrypt_version(&t("feed"), 2).await.unwrap();
    s.put_wrapping(
        &t("feed"),
        2,
        &Wrapping {
            root: RootId::new("keyfile:bb"),
            blob: vec![5; 61],
        },
        None,
    )
    .await
    .unwrap();
    other
        .shred(&t("feed"), ShredTarget::Version(1), 3)
        .await
        .unwrap();
    let events = s.events_since(start).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            KeyEventKind::Rotated.as_str(),
            KeyEventKind::Retired.as_str(),
            KeyEventKind::Rewrapped.as_str(),
            KeyEventKind::Shredded.as_str()
        ]
    );
    assert!(events.iter().all(|e| e.tenant == t("feed")));
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(s.last_event().await.unwrap(), events[3].seq);
    assert_eq!(
        other.events_since(events[1].seq).await.unwrap(),
        events[2..]
    );
}

fn approval(id: &str, target: ShredTarget, expires_at: i64) -> Approval {
    Approval {
        id: id.into(),
        tenant: t("appr"),
        target,
        requested_by: "alice".into(),
        requested_at: 10,
        expires_at,
        approved_by: None,
        executed_at: None,
        state: ApprovalState::Pending,
    }
}

pub(crate) async fn approvals_need_another_principal(s: Arc<dyn Store>, other: Arc<dyn Store>) {
    let a = approval("apr_1", ShredTarget::Tenant, 1000);
    s.create_approval(&a).await.unwrap();
    s.create_approval(&approval("apr_2", ShredTarget::Version(3), 50))
        .await
        .unwrap();
    assert_eq!(other.approval("apr_1").await.unwrap(), Some(a.clone()));
    assert_eq!(other.approval("nope").await.unwrap(), None);
    let pending: Vec<String> = s
        .pending_approvals(100)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(pending, ["apr_1"], "the expired one is not pending");
    assert!(
        !s.complete_approval("apr_1", "alice", 20).await.unwrap(),
        "the requester cannot approve"
    );
    assert!(other.complete_approval("apr_1", "bob", 20).await.unwrap());
    assert!(
        !s.complete_approval("apr_1", "carol", 21).await.unwrap(),
        "executes once"
    );
    let done = s.approval("apr_1").await.unwrap().unwrap();
    assert_eq!(done.state, ApprovalState::Executed);
    assert_eq!(done.approved_by.as_deref(), Some("bob"));
    assert_eq!(done.executed_at, Some(20));
    assert_eq!(
        s.approval("apr_2").await.unwrap().unwrap().target,
        ShredTarget::Version(3)
    );
}

pub(crate) async fn tokens_insert_look_up_expire_and_delete(s: Arc<dyn Store>, _: Arc<dyn Store>) {
    let out = s
        .insert_tokens(
            &[
                token_row("vt", "tok_a", None, None),
                token_row("vt", "tok_b", None, Some(200)),
                token_row("vt", "tok_a", None, None),
                token_row("vt", "tok_d", Some(1), None),
            ],
            100,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            InsertOutcome::Inserted,
            InsertOutcome::Inserted,
            InsertOutcome::TokenTaken,
            InsertOutcome::Inserted
        ]
    );
    let again = s
        .insert_tokens(&[token_row("vt", "tok_e", Some(1), None)], 100)
        .await
        .unwrap();
    assert_eq!(
        again,
        [InsertOutcome::Existing {
            token: "tok_d".into(),
            expires_at: None
        }]
    );
    let found = s
        .lookup_tokens(
            &t("vt"),
            &["tok_b".into(), "tok_zz".into(), "tok_a".into()],
            150,
        )
        .await
        .unwrap();
    assert_eq!(found[0].as_ref().unwrap().expires_at, Some(200));
    assert_eq!(found[0].as_ref().unwrap().sealed, vec![7; 40]);
    assert_eq!(found[1], None);
    assert_eq!(found[2].as_ref().unwrap().format, "opaque");
    assert_eq!(
        s.lookup_tokens(&t("other"), &["tok_a".into()], 150)
            .await
            .unwrap(),
        vec![None],
        "tenants never share tokens"
    );
    assert_eq!(
        s.lookup_tokens(&t("vt"), &["tok_b".into()], 250)
            .await
            .unwrap(),
        vec![None],
        "expired"
    );
    assert!(!s.delete_token(&t("vt"), "tok_b", 250).await.unwrap());
    assert!(s.delete_token(&t("vt"), "tok_a", 250).await.unwrap());
    assert!(!s.delete_token(&t("vt"), "tok_a", 250).await.unwrap());
    assert_eq!(s.purge_expired_tokens(250).await.unwrap(), 1);
    assert_eq!(s.purge_expired_tokens(250).await.unwrap(), 0);
    // An expired deterministic token gives way to a new one for the same value.
    s.insert_tokens(&[token_row("vt", "tok_f", Some(2), Some(300))], 250)
        .await
        .unwrap();
    let renewed = s
        .insert_tokens(&[token_row("vt", "tok_g", Some(2), None)], 400)
        .await
        .unwrap();
    assert_eq!(renewed, [InsertOutcome::Inserted]);
}

pub(crate) async fn deterministic_tokens_stay_unique_across_handles(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.insert_tokens(&[token_row("det", &format!("tok_{i}"), Some(9), None)], 100)
                .await
                .unwrap()
        }));
    }
    let mut tokens = Vec::new();
    for task in tasks {
        match task.await.unwrap().pop().unwrap() {
            InsertOutcome::Inserted => tokens.push(None),
            InsertOutcome::Existing { token, .. } => tokens.push(Some(token)),
            InsertOutcome::TokenTaken => {
                panic!("a deterministic race must not look like a collision")
            }
        }
    }
    assert_eq!(tokens.iter().filter(|t| t.is_none()).count(), 1);
    let winner: Vec<&String> = tokens.iter().flatten().collect();
    assert!(winner.windows(2).all(|w| w[0] == w[1]));
}

pub(crate) async fn a_change_through_one_handle_reaches_the_others_subscription(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) {
    a.create_tenant(&t("sub"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    let mut changes = a.clone().subscribe(Duration::from_millis(20));
    // Let the subscription settle: a pushing engine first says it may have missed something
    // (`All`), a polling one says nothing.
    while let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(500), changes.recv()).await {
        assert_eq!(c, StoreChange::All);
    }
    b.rotate(&t("sub"), 1, &version(2, &[("keyfile:aa", 2)]))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let change = tokio::time::timeout(Duration::from_secs(2), changes.recv())
        .await
        .expect("no change reported within 2 s");
    assert_eq!(change, Some(StoreChange::Tenant(t("sub"))));
    println!("change reported after {:?}", started.elapsed());
}

/// BYOK: binding a tenant to its own root is stored, announced in the change feed, and refused
/// for unknown or shredded tenants.
pub(crate) async fn a_tenant_root_binding_is_stored_and_announced(
    s: Arc<dyn Store>,
    other: Arc<dyn Store>,
) {
    s.create_tenant(&t("byok"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    assert_eq!(other.tenant(&t("byok")).await.unwrap().unwrap().root, None);
    let before = s.last_event().await.unwrap();
    let root = RootId::new("aws-kms:alias/customer");
    let rec = s.set_tenant_root(&t("byok"), &root).await.unwrap();
    assert_eq!(rec.root.as_ref(), Some(&root));
    assert_eq!(
        other.tenant(&t("byok")).await.unwrap().unwrap().root,
        Some(root.clone())
    );
    let events = other.events_since(before).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].tenant, t("byok"));
    assert!(matches!(
        s.set_tenant_root(&t("nobody"), &root).await,
        Err(StoreError::Refused(_))
    ));
    s.shred(&t("byok"), ShredTarget::Tenant, 5).await.unwrap();
    assert!(matches!(
        s.set_tenant_root(&t("byok"), &root).await,
        Err(StoreError::Refused(_))
    ));
}
