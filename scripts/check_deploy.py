#!/usr/bin/env python3
"""Checks the deploy/ manifests as a reviewer would, beyond "it parses":

- deploy/kubernetes.yaml: valid YAML; the Deployment runs the sidecar and the app with the
  socket on a shared emptyDir at the path the ConfigMap's config.toml names; secrets arrive
  from the Secret; probes exec the sidecar's own `probe` command; both containers are
  non-root, read-only, without privilege escalation or capabilities. (tests/config_example.rs
  loads the embedded config.toml with the sidecar's own parser.)
- deploy/kms-sidecar.service: the hardening directives are there (systemd-analyze verify,
  run by scripts/test.sh, checks the syntax).
- deploy/Dockerfile: multi-stage, final stage non-root.

Prints one "ok" line per file; exits 1 naming the first failed check. Needs PyYAML.
"""
import pathlib
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent / "deploy"


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAIL {what}")


def kubernetes() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "kubernetes.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    check(set(by_kind) == {"ConfigMap", "Secret", "Deployment"}, f"kinds: {sorted(by_kind)}")
    config = tomllib.loads(by_kind["ConfigMap"]["data"]["config.toml"])
    socket = pathlib.PurePosixPath(config["listen"]["unix_socket"])
    check("sqlite_path" not in config.get("store", {}), "the fleet config must not use SQLite")
    secret_keys = set(by_kind["Secret"]["stringData"])

    spec = by_kind["Deployment"]["spec"]["template"]["spec"]
    check(spec["securityContext"].get("runAsNonRoot") is True, "pod runAsNonRoot")
    volumes = {v["name"]: v for v in spec["volumes"]}
    containers = {c["name"]: c for c in spec["containers"]}
    check({"app", "kms-sidecar"} <= set(containers), f"containers: {sorted(containers)}")

    def socket_volume(c: dict) -> str:
        for m in c.get("volumeMounts", []):
            if socket.parent == pathlib.PurePosixPath(m["mountPath"]):
                return m["name"]
        raise SystemExit(f"FAIL {c['name']} does not mount the socket directory {socket.parent}")

    shared = socket_volume(containers["kms-sidecar"])
    check(socket_volume(containers["app"]) == shared, "app and sidecar share the socket volume")
    check("emptyDir" in volumes[shared], "the socket volume is an emptyDir")

    sidecar = containers["kms-sidecar"]
    for env in sidecar.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            check(ref["name"] == by_kind["Secret"]["metadata"]["name"], f"{env['name']}: secret name")
            check(ref["key"] in secret_keys, f"{env['name']}: key {ref['key']} in the Secret")
    names = {e["name"] for e in sidecar["env"]}
    check("KMS_SIDECAR_STORE__URL" in names, "store URL from the Secret")
    for root in config.get("roots", []):
        if "passphrase_env" in root:
            check(root["passphrase_env"] in names, f"{root['passphrase_env']} is set")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = sidecar[probe]["exec"]["command"]
        check(cmd[0].endswith("/kms-sidecar") and "probe" in cmd, f"{probe} runs `kms-sidecar probe`")
    check("--ready" in sidecar["startupProbe"]["exec"]["command"], "start-up waits for /readyz")
    check("--ready" not in sidecar["readinessProbe"]["exec"]["command"],
          "readiness does not follow the store (cached keys keep serving through an outage)")
    for c in list(spec.get("initContainers", [])) + list(containers.values()):
        sc = c.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{c['name']}: allowPrivilegeEscalation")
        check(sc.get("readOnlyRootFilesystem") is True, f"{c['name']}: readOnlyRootFilesystem")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{c['name']}: drop ALL")
        check(sc.get("runAsUser", 0) != 0, f"{c['name']}: non-root uid")
    uid = sidecar["securityContext"]["runAsUser"]
    app_uid = containers["app"]["securityContext"]["runAsUser"]
    check(any(app_uid in p.get("unix_uids", []) for p in config.get("principals", [])),
          "the app's uid is a principal")
    check(uid != app_uid, "the sidecar and the app run as different users")
    print(f"ok   deploy/kubernetes.yaml ({len(docs)} documents)")


def systemd_unit() -> None:
    text = (ROOT / "kms-sidecar.service").read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            settings.setdefault(k.strip(), []).append(v.strip())
    want = {
        "User": "kms-sidecar", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": "yes", "LimitCORE": "0", "LockPersonality": "yes",
        "RuntimeDirectory": "kms-sidecar", "StateDirectory": "kms-sidecar",
        "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
    }
    for k, v in want.items():
        check(settings.get(k) == [v], f"kms-sidecar.service: {k}={v} (has {settings.get(k)})")
    check("PrivateUsers" not in settings, "PrivateUsers would hide socket peers' uids")
    print("ok   deploy/kms-sidecar.service")


def dockerfile() -> None:
    lines = [l.strip() for l in (ROOT / "Dockerfile").read_text().splitlines()]
    froms = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    check(len(froms) >= 2, "Dockerfile is multi-stage")
    final = lines[froms[-1]:]
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    check(users and users[-1].split(":")[0] not in ("0", "root"), "final stage runs as non-root")
    check(any(l.upper().startswith("ENTRYPOINT") for l in final), "ENTRYPOINT set")
    print("ok   deploy/Dockerfile")


if __name__ == "__main__":
    kubernetes()
    systemd_unit()
    dockerfile()
    sys.exit(0)
