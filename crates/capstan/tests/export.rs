//! `capstan export kubernetes`: the manifests of the examples (and of a stack
//! using every mapped setting) are accepted by an implementation independent
//! of capstan's: the official Kubernetes Python client's models
//! (`tests/k8s/validate.py`); `--strict` refuses a stack with settings that do
//! not map, naming them.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn validate(dir: &Path) -> String {
    let python = python();
    let have = Command::new(&python)
        .args(["-c", "import kubernetes, yaml"])
        .status()
        .unwrap();
    assert!(
        have.success(),
        "the kubernetes Python client is not installed: run scripts/test, which installs what the tests need"
    );
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/k8s/validate.py"
        ))
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn export(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(capstan_bin())
        .args(["export", "kubernetes"])
        .args(args)
        .current_dir(cwd)
        .env_remove("PROFILE")
        .output()
        .unwrap()
}

#[test]
fn the_examples_export_to_manifests_the_kubernetes_client_accepts() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for (ex, objects) in [("hello", 5), ("autoscale", 5), ("flask", 6)] {
        let out_dir = tempfile::tempdir().unwrap();
        let out = export(
            &[
                "-o",
                &out_dir.path().display().to_string(),
                "--namespace",
                "demo",
            ],
            &examples.join(ex),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{ex}: {stderr}");
        assert!(stderr.contains("not mapped: "), "{ex}: {stderr}");
        let text = validate(out_dir.path());
        assert!(
            text.contains(&format!("{objects} manifests valid")),
            "{ex}: {text}"
        );
    }
    // With the Prometheus Operator's objects: hello's web service is scraped,
    // its rule file becomes a PrometheusRule that promtool accepts.
    let out_dir = tempfile::tempdir().unwrap();
    let out = export(
        &[
            "-o",
            &out_dir.path().display().to_string(),
            "--prometheus-operator",
        ],
        &examples.join("hello"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = validate(out_dir.path());
    assert!(
        text.contains("web-podmonitor.yaml: PodMonitor ok"),
        "{text}"
    );
    assert!(
        text.contains("hello-hello-prometheusrule.yaml: PrometheusRule ok"),
        "{text}"
    );
    assert!(text.contains("7 manifests valid"), "{text}");
}

#[test]
fn a_stack_with_every_mapped_setting_validates_and_strict_refuses_what_does_not_map() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.yaml"),
        r#"name: shop
services:
  api:
    image: registry.local/api:2.1
    entrypoint: ["/bin/api"]
    command: ["serve"]
    working_dir: /srv
    user: "1000"
    read_only: true
    environment: {LOG_LEVEL: info, DB_PASSWORD: hunter2}
    ports: ["80:9000", "9443:9443"]
    volumes: ["data:/var/lib/api", {type: tmpfs, target: /tmp}]
    healthcheck: {test: "curl -f http://localhost:9000/", interval: 5s}
    deploy:
      replicas: 2
      resources: {limits: {cpus: "0.25", memory: 64m}}
    x-capstan:
      autoscale: {min: 1, max: 5, metrics: [{memory: 80%}, {query: "sum(queue_depth)", target: 100}]}
      rollout:
        strategy: canary
        steps: [{weight: 20}, {pause: 30s}, {weight: 60}]
        analysis: {checks: [{check: success-rate, min: 0.99}, {query: "sum(rate(queue_errors{ {{canary}} }[1m]))", max: 1}]}
  worker:
    image: registry.local/worker:2.1
    x-capstan:
      healthcheck: {http: /ready, port: 7000}
volumes:
  data:
"#,
    )
    .unwrap();
    let out_dir = dir.path().join("k8s");
    let out = export(
        &["-o", &out_dir.display().to_string(), "--argo-rollouts"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = validate(&out_dir);
    // Deployment ×2, Service, Ingress, ConfigMap, Secret, HPA, claim, and
    // for the canary a Rollout and its AnalysisTemplate.
    assert!(text.contains("10 manifests valid"), "{text}");
    assert!(text.contains("api-rollout.yaml: Rollout ok"), "{text}");
    assert!(
        stderr.contains("not mapped: services.api.x-capstan.autoscale.metrics[1].query:"),
        "{stderr}"
    );
    // On stdout without -o: the same objects as one YAML stream.
    let out = export(&["--argo-rollouts"], dir.path());
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert_eq!(yaml.matches("\n---\n").count() + 1, 10, "{yaml}");
    // --strict: an error naming every setting, nothing written.
    let strict_dir = dir.path().join("strict");
    let out = export(
        &["--strict", "-o", &strict_dir.display().to_string()],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("have no equivalent"), "{stderr}");
    assert!(stderr.contains("not mapped: volumes.data"), "{stderr}");
    assert!(!strict_dir.exists());
}
