#!/usr/bin/env python3
"""Independent checker for the kms-sidecar sealed-envelope v1 test vectors.

This implements docs/envelope.md from the document alone, independently of the
Rust code, with nothing but the standard library and `cryptography`.

    python3 scripts/check_vectors.py [PATH ...]   # default: tests/vectors/envelope_v1.json
    python3 scripts/check_vectors.py --self-test
"""
import binascii
import hmac
import json
import os
import re
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "tests" / "vectors" / "envelope_v1.json"
FORMAT = "kms-sidecar envelope v1"
VERSION, SUITE, HEADER, TAG = 1, 1, 70, 16
OVERHEAD = HEADER + TAG  # 86
TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class OpenError(Exception):
    pass


def derive(dek: bytes, salt: bytes, head6: bytes):
    """HKDF-SHA256 -> (enc_key, nonce, commitment)."""
    okm = HKDF(hashes.SHA256(), 76, salt, b"kms-sidecar/v1" + head6).derive(dek)
    return okm[0:32], okm[32:44], okm[44:76]


def make_aad(header: bytes, purpose: int, tenant: str, caller_aad: bytes) -> bytes:
    if not (isinstance(tenant, str) and TENANT_RE.fullmatch(tenant)):
        raise OpenError(f"bad tenant {tenant!r}")
    if purpose not in (1, 2, 3):
        raise OpenError(f"bad purpose {purpose!r}")
    t = tenant.encode("ascii")
    return header + bytes([purpose, len(t)]) + t + caller_aad


def seal(dek, key_version, salt, tenant, purpose, caller_aad, plaintext) -> bytes:
    assert len(dek) == 32 and len(salt) == 32 and 1 <= key_version < 2**32
    head6 = struct.pack(">BBI", VERSION, SUITE, key_version)
    enc_key, nonce, commitment = derive(dek, salt, head6)
    header = head6 + salt + commitment
    aad = make_aad(header, purpose, tenant, caller_aad)
    return header + AESGCM(enc_key).encrypt(nonce, plaintext, aad)


def open_envelope(dek, key_version, tenant, purpose, caller_aad, env) -> bytes:
    """Open per docs/envelope.md 'Opening'; raise OpenError on any failure."""
    if len(env) < OVERHEAD:
        raise OpenError(f"too short ({len(env)} < {OVERHEAD} bytes)")
    version, suite, kv = struct.unpack(">BBI", env[0:6])
    if (version, suite) != (VERSION, SUITE) or kv == 0:
        raise OpenError(f"bad header: version {version}, suite {suite}, key_version {kv}")
    if kv != key_version:  # we hold only the DEK of `key_version`
        raise OpenError(f"no DEK for key_version {kv}")
    if len(dek) != 32:
        raise OpenError("DEK is not 32 bytes")
    header = env[0:HEADER]
    enc_key, nonce, commitment = derive(dek, env[6:38], env[0:6])
    if not hmac.compare_digest(commitment, env[38:70]):
        raise OpenError("commitment mismatch")
    aad = make_aad(header, purpose, tenant, caller_aad)
    try:
        return AESGCM(enc_key).decrypt(nonce, env[HEADER:], aad)
    except Exception as e:  # cryptography raises InvalidTag
        raise OpenError(f"GCM: {type(e).__name__}") from None


def unhex(v, field):
    if not isinstance(v, str):
        raise ValueError(f"{field}: not a hex string")
    try:
        return binascii.unhexlify(v)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: bad hex") from None


def check_vector(v) -> None:
    """Raise (with a reason) if the vector does not behave as it claims."""
    if not isinstance(v, dict):
        raise ValueError("vector is not an object")
    key, salt, aad, pt, ct = (unhex(v.get(f), f) for f in ("key", "salt", "aad", "plaintext", "ciphertext"))
    kv, purpose, tenant, result = (v.get(f) for f in ("key_version", "purpose", "tenant", "result"))
    for f, x in (("key_version", kv), ("purpose", purpose)):
        if type(x) is not int:
            raise ValueError(f"{f}: not an integer")
    if result == "valid":
        got = open_envelope(key, kv, tenant, purpose, aad, ct)  # OpenError propagates
        if got != pt:
            raise ValueError("opened to a different plaintext")
        if seal(key, kv, salt, tenant, purpose, aad, pt) != ct:
            raise ValueError("re-sealing with the vector's salt does not reproduce ciphertext")
    elif result == "invalid":
        if pt:
            raise ValueError("invalid vector has non-empty plaintext")
        try:
            open_envelope(key, kv, tenant, purpose, aad, ct)
        except OpenError:
            return
        raise ValueError("opened, but must fail")
    else:
        raise ValueError(f"result {result!r} is neither 'valid' nor 'invalid'")


def dict_no_dups(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate JSON key")
    return dict(pairs)


def check_file(path: Path):
    """Return (passed, failed, file_ok)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=dict_no_dups)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"'format' is not {FORMAT!r}")
        vectors = doc.get("vectors")
        if not isinstance(vectors, list) or not vectors:
            raise ValueError("no vectors")
    except (OSError, ValueError) as e:
        print(f"FAIL {path}: {e}")
        return 0, 0, False
    passed = failed = 0
    for i, v in enumerate(vectors):
        name = v.get("name", f"#{i}") if isinstance(v, dict) else f"#{i}"
        try:
            check_vector(v)
        except (OpenError, ValueError) as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        else:
            passed += 1
            print(f"ok   {name}")
    return passed, failed, True


def self_test() -> int:
    dek, salt, msg = os.urandom(32), os.urandom(32), b"attack at dawn"
    ctx = dict(key_version=7, tenant="acme-1.prod_x", purpose=1, caller_aad=b"ctx")
    env = seal(dek, ctx["key_version"], salt, ctx["tenant"], ctx["purpose"], ctx["caller_aad"], msg)
    checks = [("round trip", env, ctx, dek, msg)]
    for bit in range(len(env) * 8):
        bad = bytearray(env)
        bad[bit // 8] ^= 1 << (bit % 8)
        checks.append((f"bit {bit} flipped", bytes(bad), ctx, dek, None))
    checks += [
        ("truncated", env[:-1], ctx, dek, None),
        ("extended", env + b"\0", ctx, dek, None),
        ("wrong key", env, ctx, os.urandom(32), None),
        ("wrong tenant", env, {**ctx, "tenant": "acme-2.prod_x"}, dek, None),
        ("wrong purpose", env, {**ctx, "purpose": 2}, dek, None),
        ("wrong aad", env, {**ctx, "caller_aad": b"ctx!"}, dek, None),
        ("wrong key_version", env, {**ctx, "key_version": 8}, dek, None),
    ]
    passed = failed = 0
    for name, e, c, k, want in checks:
        try:
            got = open_envelope(k, c["key_version"], c["tenant"], c["purpose"], c["caller_aad"], e)
            ok = got == want
        except OpenError:
            ok = want is None
        passed, failed = passed + ok, failed + (not ok)
        if not ok:
            print(f"FAIL {name}")
    print(f"self-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv) -> int:
    if argv == ["--self-test"]:
        return self_test()
    passed = failed = 0
    all_ok = True
    for p in [Path(a) for a in argv] or [DEFAULT]:
        p_ok, p_fail, file_ok = check_file(p)
        passed, failed, all_ok = passed + p_ok, failed + p_fail, all_ok and file_ok
    print(f"vectors: {passed} passed, {failed} failed")
    return 0 if all_ok and failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
