"""A key from a Kubernetes secret, read through the cluster API with the pod's own service account.

    api_key_secret: s2/s2-api-key/S2_API_KEY     (namespace/name/key; name/key = the pod's namespace)

The pod needs RBAC ``get`` on that one secret. Nothing is written or logged; errors name the secret,
never its value. ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service-account files are the standard
in-cluster ones; ``S2_KUBERNETES_API`` overrides the API address (tests, proxies).
"""
from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

SA = Path(os.environ.get("S2_SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))


def read_kubernetes_secret(ref: str, timeout_s: float = 10.0) -> str:
    parts = ref.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"api_key_secret {ref!r}: expected NAMESPACE/NAME/KEY or NAME/KEY")
    sa = Path(os.environ.get("S2_SERVICE_ACCOUNT_DIR", SA))
    if len(parts) == 2:
        try:
            parts.insert(0, (sa / "namespace").read_text().strip())
        except OSError:
            raise ValueError(f"api_key_secret {ref}: no namespace given and not in a pod ({sa}/namespace)") from None
    namespace, name, key = parts
    api = os.environ.get("S2_KUBERNETES_API") or (
        f"https://{os.environ.get('KUBERNETES_SERVICE_HOST', '')}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}")
    try:
        token = (sa / "token").read_text().strip()
    except OSError:
        raise ValueError(f"api_key_secret {ref}: no service-account token at {sa}/token") from None
    context = ssl.create_default_context(cafile=str(sa / "ca.crt")) if (sa / "ca.crt").exists() else None
    req = urllib.request.Request(f"{api}/api/v1/namespaces/{namespace}/secrets/{name}",
                                 headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ValueError(f"api_key_secret {ref}: the cluster API answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"api_key_secret {ref}: cannot reach the cluster API at {api} ({e})") from None
    data = (doc.get("data") or {}).get(key)
    if data is None:
        raise ValueError(f"api_key_secret {ref}: secret {namespace}/{name} has no key {key!r}")
    value = base64.b64decode(data).decode().strip()
    if not value:
        raise ValueError(f"api_key_secret {ref}: empty")
    return value
