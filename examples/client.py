#!/usr/bin/env python3
"""A kms-sidecar client in the Python standard library only, over the Unix socket.

Usage: python3 examples/client.py [SOCKET]   (default ./data/kms-sidecar.sock)
"""
import base64
import http.client
import json
import socket
import sys


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class KmsSidecarError(Exception):
    def __init__(self, status: int, code: str, message: str, request_id: str):
        super().__init__(f"{status} {code}: {message} (request {request_id})")
        self.status, self.code, self.request_id = status, code, request_id


class KmsSidecar:
    def __init__(self, socket_path: str = "./data/kms-sidecar.sock"):
        self.socket_path = socket_path

    def _post(self, path: str, body: dict) -> dict:
        conn = UnixHTTPConnection(self.socket_path)
        try:
            conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
        finally:
            conn.close()
        if resp.status != 200:
            err = data["error"]
            raise KmsSidecarError(resp.status, err["code"], err["message"], err["request_id"])
        return data

    def seal(self, tenant: str, plaintext: bytes, aad: bytes = b"") -> tuple[bytes, int]:
        r = self._post(f"/v1/tenants/{tenant}/seal", {
            "plaintext": base64.b64encode(plaintext).decode(),
            "aad": base64.b64encode(aad).decode(),
        })
        return base64.b64decode(r["ciphertext"]), r["key_version"]

    def open(self, tenant: str, ciphertext: bytes, aad: bytes = b"") -> bytes:
        r = self._post(f"/v1/tenants/{tenant}/open", {
            "ciphertext": base64.b64encode(ciphertext).decode(),
            "aad": base64.b64encode(aad).decode(),
        })
        return base64.b64decode(r["plaintext"])


def main() -> int:
    client = KmsSidecar(sys.argv[1] if len(sys.argv) > 1 else "./data/kms-sidecar.sock")
    ct, version = client.seal("demo", b"jane@example.com", aad=b"user-42")
    print(f"sealed {len(ct)} bytes under key version {version}")
    assert client.open("demo", ct, aad=b"user-42") == b"jane@example.com"
    print("opened it again")
    try:
        client.open("demo", ct, aad=b"user-43")
        raise SystemExit("opened under the wrong AAD")
    except KmsSidecarError as e:
        assert e.code == "decrypt_failed", e
        print(f"wrong AAD refused: {e.code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
