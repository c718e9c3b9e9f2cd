"""Reads every manifest `capstan export kubernetes -o DIR` wrote into the
models of the official Kubernetes Python client (an implementation
independent of capstan's k8s-openapi types): each document must deserialize
(the client checks required fields and types) and serialize back to the same
document. Prints one line per object; exits 1 on the first mismatch.

Usage: validate.py DIR
"""

import json
import os
import sys

import yaml
from kubernetes import client

MODELS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}


def main(folder):
    api = client.ApiClient()
    n = 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            doc = yaml.safe_load(f)
        model = MODELS.get((doc.get("apiVersion"), doc.get("kind")))
        if model is None:
            print(f"{name}: no model for {doc.get('apiVersion')} {doc.get('kind')}")
            sys.exit(1)
        obj = api.deserialize(json.dumps(doc), model, "application/json")
        back = api.sanitize_for_serialization(obj)
        if back != doc:
            print(f"{name}: changed through {model}:\n{json.dumps(doc, sort_keys=True)}\n{json.dumps(back, sort_keys=True)}")
            sys.exit(1)
        print(f"{name}: {model} ok")
        n += 1
    print(f"{n} manifests valid")


main(sys.argv[1])
