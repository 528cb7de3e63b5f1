"""JSON Schemas for the custom resources the manifests use (kubernetes-validate knows only core APIs).

Written for this project from the published API references of each CRD, and limited to the
fields kvr's manifests use: every object is closed (`additionalProperties: false`), so a typo or a
field of another API version fails. They are stricter than the real CRDs, never looser.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_LABELS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _LABELS, "annotations": {"type": "object"}},
    "additionalProperties": False,
}
_MATCH_LABELS = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": _LABELS},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _MATCH_LABELS,
            "namespaceSelector": {"type": "object"},
            "jobLabel": {"type": "string"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "port": {"type": "string"},
                        "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

INFERENCE_POOL = _resource(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    {
        "type": "object",
        "required": ["selector", "targetPorts", "endpointPickerRef"],
        "properties": {
            "selector": _MATCH_LABELS,
            "targetPorts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": {
                    "type": "object",
                    "required": ["number"],
                    "properties": {"number": _PORT},
                    "additionalProperties": False,
                },
            },
            "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
            "endpointPickerRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "group": {"type": "string"},
                    "kind": {"type": "string", "minLength": 1},
                    "name": _NAME,
                    "port": {
                        "type": "object",
                        "required": ["number"],
                        "properties": {"number": _PORT},
                        "additionalProperties": False,
                    },
                    "failureMode": {"enum": ["FailOpen", "FailClose"]},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
)

_PARENT_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "group": {"type": "string"},
        "kind": {"type": "string"},
        "name": _NAME,
        "namespace": _NAME,
        "sectionName": {"type": "string"},
        "port": _PORT,
    },
    "additionalProperties": False,
}

HTTP_ROUTE = _resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    {
        "type": "object",
        "required": ["parentRefs", "rules"],
        "properties": {
            "parentRefs": {"type": "array", "minItems": 1, "items": _PARENT_REF},
            "hostnames": {"type": "array", "items": {"type": "string"}},
            "rules": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "matches": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "path": {
                                        "type": "object",
                                        "properties": {
                                            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                            "value": {"type": "string"},
                                        },
                                        "additionalProperties": False,
                                    },
                                    "headers": {"type": "array"},
                                },
                                "additionalProperties": False,
                            },
                        },
                        "backendRefs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "group": {"type": "string"},
                                    "kind": {"type": "string"},
                                    "name": _NAME,
                                    "port": _PORT,
                                    "weight": {"type": "integer", "minimum": 0},
                                },
                                "additionalProperties": False,
                            },
                        },
                        "timeouts": {
                            "type": "object",
                            "properties": {"request": _DURATION, "backendRequest": _DURATION},
                            "additionalProperties": False,
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["alert", "expr"],
                                "properties": {
                                    "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                    "expr": {"type": "string", "minLength": 1},
                                    "for": _DURATION,
                                    "labels": _LABELS,
                                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                },
                                "additionalProperties": False,
                            },
                        },
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

# (apiVersion, kind) → schema
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
}

# cert-manager (cert-manager.io/v1): the Issuers and Certificates of deploy/k8s/nats/certificates.yaml.
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": {"const": "cert-manager.io"}},
    "additionalProperties": False,
}
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
]
CERT_MANAGER_ISSUER = _resource(
    "cert-manager.io/v1",
    "Issuer",
    {
        "type": "object",
        "properties": {
            "selfSigned": {"type": "object", "additionalProperties": False},
            "ca": {"type": "object", "required": ["secretName"], "properties": {"secretName": _NAME}, "additionalProperties": False},
        },
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
    },
)
CERT_MANAGER_CERTIFICATE = _resource(
    "cert-manager.io/v1",
    "Certificate",
    {
        "type": "object",
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": _NAME,
            "commonName": {"type": "string", "minLength": 1, "maxLength": 64},
            "isCA": {"type": "boolean"},
            "duration": _DURATION,
            "renewBefore": _DURATION,
            "dnsNames": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
            "privateKey": {
                "type": "object",
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                },
                "additionalProperties": False,
            },
            "issuerRef": _ISSUER_REF,
        },
        "additionalProperties": False,
    },
)
CRD_SCHEMAS.update(
    {
        ("cert-manager.io/v1", "Issuer"): CERT_MANAGER_ISSUER,
        ("cert-manager.io/v1", "Certificate"): CERT_MANAGER_CERTIFICATE,
    }
)
