"""Writes keda.sh-v1alpha1-scaledobject.json, the JSON schema deploy-check validates
worker-scaledobject.yaml against, from the ScaledObject model of the PyPI package
cloudcoil-models-keda, which is generated from the CustomResourceDefinition of the KEDA release
of its version (2.16.1). Run it in a virtualenv holding that package:

    python3 -m venv /tmp/keda && /tmp/keda/bin/pip install cloudcoil-models-keda==2.16.1.0
    /tmp/keda/bin/python deploy/kubernetes/schemas/make_keda_schema.py

The schema is the model's (pydantic's JSON schema of it, with the CRD's field names), not the
CRD's openAPIV3Schema itself, with one change: every object that lists its fields allows no
others, as the API server does with strict field validation (kubectl apply --validate=strict),
so a misspelt field fails the check instead of being dropped.
"""

import importlib.metadata
import json
import pathlib

from cloudcoil.models.keda.v1alpha1 import ScaledObject

VERSION = "2.16.1.0"
OUTPUT = pathlib.Path(__file__).with_name("keda.sh-v1alpha1-scaledobject.json")


def strict(node):
    """Forbids unlisted fields in every object schema that lists its fields; drops titles."""
    if isinstance(node, dict):
        node.pop("title", None)
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def dump(value, indent=0):
    """JSON with each object or array that fits in 100 columns on one line, to stay short."""
    compact = json.dumps(value, sort_keys=True)
    if not isinstance(value, (dict, list)) or indent + len(compact) <= 100 or not value:
        return compact
    pad = " " * (indent + 1)
    if isinstance(value, list):
        items = [pad + dump(item, indent + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [pad + json.dumps(key) + ": " + dump(value[key], indent + 1) for key in sorted(value)]
    return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


def main():
    installed = importlib.metadata.version("cloudcoil-models-keda")
    if installed != VERSION:
        raise SystemExit(f"cloudcoil-models-keda {installed} is installed, {VERSION} is wanted")
    schema = strict(ScaledObject.model_json_schema(by_alias=True, mode="validation"))
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"KEDA ScaledObject (keda.sh/v1alpha1), from cloudcoil-models-keda {VERSION} "
            "(KEDA 2.16.1's CRD) by deploy/kubernetes/schemas/make_keda_schema.py"
        ),
        **schema,
    }
    OUTPUT.write_text(dump(schema) + "\n")


if __name__ == "__main__":
    main()
