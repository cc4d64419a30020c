//! In-process cost of the v1 envelope beside raw AES-256-GCM on the same sizes, so the
//! envelope's overhead (HKDF per message, commitment, AAD assembly, allocation) reads as a ratio.
//! Run: `cargo bench --bench envelope`.

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kms_sidecar::crypto::DataKey;
use kms_sidecar::crypto::envelope::{self, Envelope, Purpose, SealContext};
use kms_sidecar::tenant::TenantId;

const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];

fn label(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

fn benches(c: &mut Criterion) {
    let key = DataKey::from_slice(&[7; 32]).unwrap();
    let tenant = TenantId::parse("acme").unwrap();
    let ctx = SealContext {
        tenant: &tenant,
        purpose: Purpose::Data,
        aad: b"order-7",
    };
    let raw = Aes256Gcm::new_from_slice(&[7; 32]).unwrap();
    let nonce = Nonce::from([1u8; 12]);

    for n in SIZES {
        let pt = vec![0x5a_u8; n];
        let ct = envelope::seal(&key, 1, &ctx, &pt).unwrap();
        let mut g = c.benchmark_group(label(n));
        g.throughput(Throughput::Bytes(n as u64));
        if n >= 64 * 1024 {
            g.sample_size(30);
        }
        g.bench_function(BenchmarkId::new("raw_aes_gcm_encrypt", n), |b| {
            let mut buf = pt.clone();
            b.iter(|| {
                raw.encrypt_inout_detached(&nonce, b"order-7", buf.as_mut_slice().into())
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("raw_ring_encrypt", n), |b| {
            let key = ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).unwrap(),
            );
            let mut buf = pt.clone();
            b.iter(|| {
                key.seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key([1; 12]),
                    ring::aead::Aad::from(b"order-7"),
                    &mut buf,
                )
                .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("raw_aes_gcm_decrypt", n), |b| {
            let mut sealed = pt.clone();
            let tag = raw
                .encrypt_inout_detached(&nonce, b"order-7", sealed.as_mut_slice().into())
                .unwrap();
            b.iter(|| {
                let mut buf = sealed.clone();
                raw.decrypt_inout_detached(&nonce, b"order-7", buf.as_mut_slice().into(), &tag)
                    .unwrap();
                buf
            })
        });
        g.bench_function(BenchmarkId::new("envelope_seal", n), |b| {
            b.iter(|| envelope::seal(&key, 1, &ctx, black_box(&pt)).unwrap())
        });
        g.bench_function(BenchmarkId::new("envelope_open", n), |b| {
            b.iter(|| {
                Envelope::parse(black_box(&ct))
                    .unwrap()
                    .open(&key, &ctx)
                    .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = envelope_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(envelope_benches);
