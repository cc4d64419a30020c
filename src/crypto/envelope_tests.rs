use proptest::prelude::*;

use super::*;

const CASES: u32 = 10_000;

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn key(b: u8) -> DataKey {
    DataKey::from_slice(&[b; 32]).unwrap()
}

fn ctx<'a>(t: &'a TenantId, aad: &'a [u8]) -> SealContext<'a> {
    SealContext {
        tenant: t,
        purpose: Purpose::Data,
        aad,
    }
}

fn open(bytes: &[u8], k: &DataKey, c: &SealContext<'_>) -> Result<Vec<u8>, CryptoError> {
    Envelope::parse(bytes)
        .map_err(|_| CryptoError::DecryptFailed)?
        .open(k, c)
        .map(|p| p.expose().to_vec())
}

#[test]
fn overhead_is_86_bytes_for_any_length() {
    let t = tenant("acme");
    for n in [0usize, 1, 15, 16, 17, 1024, 70_000] {
        let ct = seal(&key(1), 1, &ctx(&t, b""), &vec![9u8; n]).unwrap();
        assert_eq!(ct.len(), n + 86);
        assert_eq!(OVERHEAD, 86);
    }
}

#[test]
fn header_carries_version_suite_and_key_version() {
    let t = tenant("acme");
    let ct = seal(&key(1), 0x0102_0304, &ctx(&t, b""), b"hi").unwrap();
    assert_eq!(&ct[..6], &[1, 1, 1, 2, 3, 4]);
    assert_eq!(Envelope::parse(&ct).unwrap().key_version(), 0x0102_0304);
}

#[test]
fn two_seals_of_one_plaintext_differ() {
    let t = tenant("acme");
    let a = seal(&key(1), 1, &ctx(&t, b""), b"same").unwrap();
    let b = seal(&key(1), 1, &ctx(&t, b""), b"same").unwrap();
    assert_ne!(a, b);
}

#[test]
fn fixed_salt_is_deterministic() {
    let t = tenant("acme");
    let a = seal_with_salt(&key(1), 3, &ctx(&t, b"x"), b"v", &[5; 32]).unwrap();
    let b = seal_with_salt(&key(1), 3, &ctx(&t, b"x"), b"v", &[5; 32]).unwrap();
    assert_eq!(a, b);
}

#[test]
fn key_version_zero_is_refused_both_ways() {
    let t = tenant("acme");
    assert_eq!(
        seal(&key(1), 0, &ctx(&t, b""), b"x").unwrap_err(),
        CryptoError::Malformed
    );
    let mut ct = seal(&key(1), 1, &ctx(&t, b""), b"x").unwrap();
    ct[2..6].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(Envelope::parse(&ct).unwrap_err(), CryptoError::Malformed);
}

#[test]
fn unknown_version_and_suite_are_rejected() {
    let t = tenant("acme");
    let ct = seal(&key(1), 1, &ctx(&t, b""), b"x").unwrap();
    for (i, v) in [(0usize, 0u8), (0, 2), (0, 0xff), (1, 0), (1, 2), (1, 0xff)] {
        let mut bad = ct.clone();
        bad[i] = v;
        assert_eq!(Envelope::parse(&bad).unwrap_err(), CryptoError::Malformed);
    }
}

#[test]
fn open_fails_for_another_purpose() {
    let t = tenant("acme");
    let ct = seal(&key(1), 1, &ctx(&t, b""), b"x").unwrap();
    let as_datakey = SealContext {
        purpose: Purpose::DataKey,
        ..ctx(&t, b"")
    };
    assert_eq!(
        open(&ct, &key(1), &as_datakey).unwrap_err(),
        CryptoError::DecryptFailed
    );
}

#[test]
fn commitment_rejects_a_different_key_before_decrypting() {
    // Same salt, same everything but the key: the commitment differs, so the envelope is
    // bound to exactly one key.
    let t = tenant("acme");
    let a = seal_with_salt(&key(1), 1, &ctx(&t, b""), b"x", &[1; 32]).unwrap();
    let b = seal_with_salt(&key(2), 1, &ctx(&t, b""), b"x", &[1; 32]).unwrap();
    assert_ne!(a[38..70], b[38..70]);
    assert_eq!(
        open(&a, &key(2), &ctx(&t, b"")).unwrap_err(),
        CryptoError::DecryptFailed
    );
}

fn arb_tenant() -> impl Strategy<Value = TenantId> {
    "[A-Za-z0-9._-]{1,128}".prop_map(|s| TenantId::parse(&s).unwrap())
}

fn arb_key() -> impl Strategy<Value = DataKey> {
    any::<[u8; 32]>().prop_map(|k| DataKey::from_slice(&k).unwrap())
}

fn sealed() -> impl Strategy<Value = (DataKey, u32, TenantId, Vec<u8>, Vec<u8>, Vec<u8>)> {
    (
        arb_key(),
        1u32..,
        arb_tenant(),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(k, v, t, aad, pt)| {
            let ct = seal(&k, v, &ctx(&t, &aad), &pt).unwrap();
            (k, v, t, aad, pt, ct)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn seal_then_open_round_trips((k, v, t, aad, pt, ct) in sealed()) {
        let env = Envelope::parse(&ct).unwrap();
        prop_assert_eq!(env.key_version(), v);
        prop_assert_eq!(env.plaintext_len(), pt.len());
        let opened = env.open(&k, &ctx(&t, &aad)).unwrap();
        prop_assert_eq!(opened.expose(), &pt[..]);
    }

    #[test]
    fn any_flipped_bit_fails((k, _v, t, aad, _pt, ct) in sealed(), bit in any::<prop::sample::Index>()) {
        let mut bad = ct.clone();
        let i = bit.index(ct.len() * 8);
        bad[i / 8] ^= 1 << (i % 8);
        prop_assert_eq!(open(&bad, &k, &ctx(&t, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn any_truncation_fails((k, _v, t, aad, _pt, ct) in sealed(), cut in any::<prop::sample::Index>()) {
        let keep = cut.index(ct.len());
        prop_assert_eq!(open(&ct[..keep], &k, &ctx(&t, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn any_extension_fails((k, _v, t, aad, _pt, ct) in sealed(), extra in proptest::collection::vec(any::<u8>(), 1..40)) {
        let mut longer = ct.clone();
        longer.extend_from_slice(&extra);
        prop_assert_eq!(open(&longer, &k, &ctx(&t, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn open_fails_for_another_tenant((k, _v, t, aad, _pt, ct) in sealed(), other in arb_tenant()) {
        prop_assume!(other != t);
        prop_assert_eq!(open(&ct, &k, &ctx(&other, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn open_fails_for_another_aad((k, _v, t, aad, _pt, ct) in sealed(), other in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(other != aad);
        prop_assert_eq!(open(&ct, &k, &ctx(&t, &other)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn open_fails_for_another_key_version((k, v, t, aad, _pt, ct) in sealed(), other in 1u32..) {
        prop_assume!(other != v);
        // The header names another version: the same key must not open it.
        let mut moved = ct.clone();
        moved[2..6].copy_from_slice(&other.to_be_bytes());
        prop_assert_eq!(open(&moved, &k, &ctx(&t, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn open_fails_under_another_key((_k, _v, t, aad, _pt, ct) in sealed(), other in arb_key()) {
        prop_assert_eq!(open(&ct, &other, &ctx(&t, &aad)).unwrap_err(), CryptoError::DecryptFailed);
    }

    #[test]
    fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(env) = Envelope::parse(&bytes) {
            prop_assert!(bytes.len() >= OVERHEAD);
            prop_assert!(env.key_version() != 0);
            prop_assert_eq!(env.plaintext_len(), bytes.len() - OVERHEAD);
        } else {
            prop_assert!(bytes.len() < OVERHEAD || bytes[0] != 1 || bytes[1] != 1 || bytes[2..6] == [0; 4]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// The in-place paths give the same bytes as the copying ones, grown buffers included.
    #[test]
    fn in_place_seal_and_open_match_the_copying_paths(
        pt in proptest::collection::vec(any::<u8>(), 0..3000),
        split in 0usize..3000,
        salt in any::<[u8; SALT_LEN]>(),
    ) {
        let t = tenant("acme");
        let c = ctx(&t, b"aad");
        let copied = seal_with_salt(&key(1), 3, &c, &pt, &salt).unwrap();
        // Start small and grow in two steps, as a chunked request body does.
        let cut = split.min(pt.len());
        let mut buf = SealBuffer::with_capacity(1);
        buf.extend_from_slice(&pt[..cut]);
        buf.extend_from_slice(&pt[cut..]);
        prop_assert_eq!(buf.plaintext(), &pt[..]);
        let in_place = seal_buffer_with_salt(&key(1), 3, &c, buf, &salt).unwrap();
        prop_assert_eq!(&in_place, &copied);
        let opened = open_owned(&key(1), &c, SecretVec::from(in_place)).unwrap();
        prop_assert_eq!(opened.expose(), &pt[..]);
    }

    /// A flipped bit anywhere makes the in-place open fail like the copying one.
    #[test]
    fn in_place_open_rejects_any_flipped_bit(
        pt in proptest::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let t = tenant("acme");
        let c = ctx(&t, b"");
        let mut ct = seal(&key(1), 1, &c, &pt).unwrap();
        let i = at.index(ct.len());
        ct[i] ^= 1 << bit;
        let err = open_owned(&key(1), &c, SecretVec::from(ct)).unwrap_err();
        prop_assert!(matches!(err, CryptoError::DecryptFailed | CryptoError::Malformed));
    }
}

#[test]
fn seal_buffer_from_headroom_needs_the_header_room() {
    assert_eq!(
        SealBuffer::from_headroom(SecretVec::from(vec![0; HEADER_LEN - 1])).unwrap_err(),
        CryptoError::Malformed
    );
    let mut raw = vec![0; HEADER_LEN];
    raw.extend_from_slice(b"hello");
    let buf = SealBuffer::from_headroom(SecretVec::from(raw)).unwrap();
    assert_eq!(buf.plaintext(), b"hello");
    let t = tenant("acme");
    let ct = seal_buffer(&key(2), 1, &ctx(&t, b""), buf).unwrap();
    assert_eq!(open(&ct, &key(2), &ctx(&t, b"")).unwrap(), b"hello");
}

#[test]
fn append_with_keeps_only_what_was_written() {
    let mut buf = SealBuffer::with_capacity(4);
    buf.extend_from_slice(b"ab");
    buf.append_with(10, |room| {
        assert_eq!(room.len(), 10);
        room[..3].copy_from_slice(b"cde");
        Ok::<_, ()>(3)
    })
    .unwrap();
    assert_eq!(buf.plaintext(), b"abcde");
    // A failing writer leaves what was there before.
    assert_eq!(
        buf.append_with(5, |room| {
            room.fill(9);
            Err::<usize, _>("bad input")
        }),
        Err("bad input")
    );
    assert_eq!(buf.plaintext(), b"abcde");
    let t = tenant("acme");
    let ct = seal_buffer(&key(4), 1, &ctx(&t, b""), buf).unwrap();
    assert_eq!(open(&ct, &key(4), &ctx(&t, b"")).unwrap(), b"abcde");
}
