"""Reads every manifest `capstan export kubernetes -o DIR` wrote into the
models of the official Kubernetes Python client (an implementation
independent of capstan's k8s-openapi types): each document must deserialize
(the client checks required fields and types) and serialize back to the same
document. Prints one line per object; exits 1 on the first mismatch.

Usage: validate.py DIR
"""

import json
import os
import subprocess
import sys
import tempfile

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


# Custom resources have no model in the client: their shape is checked here,
# and a PrometheusRule's groups by promtool, as Prometheus would load them.
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("argoproj.io/v1alpha1", "Rollout"),
    ("argoproj.io/v1alpha1", "AnalysisTemplate"),
}


def check_crd(name, doc):
    kind = doc["kind"]
    assert doc["metadata"]["name"], name
    spec = doc["spec"]
    if kind == "PodMonitor":
        assert spec["selector"]["matchLabels"] and spec["podMetricsEndpoints"], name
    elif kind == "PrometheusRule":
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            json.dump({"groups": spec["groups"]}, f)
            f.flush()
            out = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name}: promtool refuses the groups:\n{out.stdout}{out.stderr}")
                sys.exit(1)
    elif kind == "Rollout":
        assert spec["workloadRef"]["kind"] == "Deployment" and spec["strategy"]["canary"]["steps"], name
    elif kind == "AnalysisTemplate":
        for m in spec["metrics"]:
            assert m["name"] and m["successCondition"] and m["provider"]["prometheus"]["query"], name


def main(folder):
    api = client.ApiClient()
    n = 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            doc = yaml.safe_load(f)
        if (doc.get("apiVersion"), doc.get("kind")) in CRDS:
            check_crd(name, doc)
            print(f"{name}: {doc['kind']} ok")
            n += 1
            continue
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
